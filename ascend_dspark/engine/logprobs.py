"""The target's log-probabilities that requests ask for (OpenAI's `logprobs`, `top_logprobs`,
and vLLM's `prompt_logprobs`), computed on the device inside the step that produced the
logits, so they travel in the step's one host copy (host_copy.py).

They are the raw model's (before temperature and filters), as OpenAI reports them, in float32
whatever the model's dtype.
"""

from __future__ import annotations

import torch

PROMPT_LOGPROB_SLICE = 256     # prompt positions whose logits are materialised at once


def logprobs(n: int, logits: torch.Tensor, tokens: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The log-probabilities of `tokens` under `logits`, and the top-n alternatives; keys
    `prefix` + logprob / top_ids / top_logprobs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = {prefix + "logprob": logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)}
    if n:
        top = logp.topk(n, dim=-1)
        out[prefix + "top_ids"], out[prefix + "top_logprobs"] = top.indices, top.values
    return out


def prompt_logprobs_of(target, hidden: torch.Tensor, nxt: torch.Tensor, rows: list[int], n: int,
                       ops) -> dict[str, torch.Tensor]:
    """The target's logprob of the token after every position of the prefill rows `rows`
    (and the top-n alternatives), from a prefill's hidden states [rows, width, hidden]: one
    float32 log-softmax per slice of positions, so a long chunk never holds [width, vocab]
    logits of every row at once. Positions whose next token is not a prompt token are reported
    too; the engine keeps only the prompt's (output_processor.py)."""
    index = torch.tensor(rows).to(hidden.device)
    hidden, nxt = hidden.index_select(0, index), nxt.index_select(0, index)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, hidden.shape[1], PROMPT_LOGPROB_SLICE):
        end = start + PROMPT_LOGPROB_SLICE
        parts.append(logprobs(n, target.logits(hidden[:, start:end], ops), nxt[:, start:end], "prompt_"))
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}
