"""From a step's tokens to what a client sees: stops, text, deltas.

The engine hands each request's committed tokens here after every step. Tokens are
appended one by one, so a request stops exactly at its first stop token, at max_tokens or
at max_model_len even when an accepted block runs past them; its text grows incrementally
and is cut at the first stop string; a delta carries only what the client has not seen,
holding back a tail that could still become a stop string.
"""

from __future__ import annotations

from ascend_dspark.spec.sampling import SamplingParams

from .request import Request, RequestDelta


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that finish a request: its stop_token_ids, and EOS unless ignored."""
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return frozenset(ids)

    def commit(self, requests: list[Request], token_lists: list[list[int]], accepted: list[int] | None,
               verify_lens: list[int] | None, confidences: list[list[float]] | None,
               logprobs: list | None = None) -> None:
        """Append committed tokens; stop at EOS / stop token, max_tokens, stop string, length.

        `accepted` is None for the prefill's first token (not a verify step); `logprobs[i][j]`
        is (logprob, [(id, logprob), ...]) of row i's token j, or None where not asked."""
        for i, (r, tokens) in enumerate(zip(requests, token_lists)):
            if accepted is not None:
                stop = next((j for j, tok in enumerate(tokens) if tok in r.stop_ids), None)
                verified = verify_lens[i]
                conf = confidences[i][:verified] if confidences is not None else None
                r.stats.record(accepted[i], verified, conf, stop)
                r.num_cached += len(tokens)
            for j, tok in enumerate(tokens):
                r.output.append(tok)
                if r.params.logprobs is not None:
                    r.logprobs.append(logprobs[i][j])
                if tok in r.stop_ids:
                    r.finish_reason = "stop"
                    break
                if r.grammar is not None and j == len(tokens) - 1 and r.grammar.terminated:
                    r.finish_reason = "stop"            # the output is complete (the grammar ended)
                    break
                # Token by token: an accepted block may run past either limit.
                if len(r.output) >= r.params.max_tokens or len(r.prompt_ids) + len(r.output) >= self.max_model_len:
                    r.finish_reason = "length"
                    break
            if r.detokenize:
                self._update_text(r)

    def _update_text(self, r: Request) -> None:
        """Extend the text by this step's tokens; cut it at the first stop string (which
        finishes the request). Only the new text (plus a stop string's length of overlap) is
        searched."""
        grown = r.detokenizer.update(self.tokenizer, r.output, final=r.finish_reason is not None)
        if not grown:
            return
        start = max(len(r.text) - max((len(s) for s in r.params.stop), default=0), 0)
        r.text += grown
        hits = [i for i in (r.text.find(s, start) for s in r.params.stop) if i >= 0]
        if hits:
            r.text = r.text[: min(hits)]
            r.finish_reason = "stop"

    def record_prompt_logprobs(self, chunks: list, host: dict[str, list]) -> None:
        """Keep the prompt logprobs a prefill computed (logprobs.prompt_logprobs_of):
        position p gives the logprob of prompt token p + 1. Each prompt token is recorded
        once, in order: a chunk's last position predicts the next chunk's first token, and a
        request recomputed after preemption records nothing twice."""
        rows, _ = prompt_logprob_rows([c.request for c in chunks])
        ids, vals = host.get("prompt_top_ids"), host.get("prompt_top_logprobs")
        for j, b in enumerate(rows):
            chunk, r = chunks[b], chunks[b].request
            n = r.params.prompt_logprobs
            for k, lp in enumerate(host["prompt_logprob"][j][: chunk.end - chunk.start]):
                p = chunk.start + k
                if p + 1 < len(r.prompt_ids) and p == len(r.prompt_logprobs):
                    r.prompt_logprobs.append((lp, list(zip(ids[j][k][:n], vals[j][k][:n])) if n else []))

    def delta(self, r: Request) -> RequestDelta:
        """What the request produced since its last delta (the first one also carries the
        prompt logprobs, when asked for)."""
        prompt_logprobs = None
        if r.params.prompt_logprobs is not None and not r.prompt_logprobs_sent:
            prompt_logprobs, r.prompt_logprobs_sent = list(r.prompt_logprobs), True
        new_tokens = r.output[r.emitted_tokens:]
        new_logprobs = r.logprobs[r.emitted_tokens:] if r.params.logprobs is not None else None
        r.emitted_tokens = len(r.output)
        text_delta = None
        if r.detokenize:
            end = len(r.text)
            if r.finish_reason is None and r.params.stop:
                # Hold back a tail that could be the start of a stop string.
                end = min(end, len(r.text) - max(len(s) for s in r.params.stop) + 1)
            end = max(end, r.emitted_text)
            text_delta, r.emitted_text = r.text[r.emitted_text:end], end
        return RequestDelta(r.request_id, new_tokens, text_delta, r.finish_reason, r.stats,
                            len(r.prompt_ids), len(r.output), new_logprobs, error=r.error,
                            prompt_logprobs=prompt_logprobs)


def logprob_rows(host: dict[str, list], prefix: str, requests: list[Request]) -> list | None:
    """Per request row, per token position: (logprob, [(id, logprob) x its top-n]) or None."""
    if prefix + "logprob" not in host:
        return None
    chosen = host[prefix + "logprob"]
    ids, vals = host.get(prefix + "top_ids"), host.get(prefix + "top_logprobs")
    rows = []
    for b, r in enumerate(requests):
        n = r.params.logprobs
        if n is None:
            rows.append(None)
            continue
        row = chosen[b] if isinstance(chosen[b], list) else [chosen[b]]
        tops = (ids[b], vals[b]) if n else None
        if tops is not None and not isinstance(tops[0][0], list):      # prefill: one position
            tops = ([tops[0]], [tops[1]])
        rows.append([(lp, list(zip(tops[0][j][:n], tops[1][j][:n])) if n else []) for j, lp in enumerate(row)])
    return rows


def prompt_logprob_rows(requests: list[Request]) -> tuple[list[int], int]:
    """The rows of a prefill whose requests asked for prompt logprobs, and the most top
    alternatives any of them wants; ([], 0) when none did (the prefill then costs nothing more)."""
    rows = [b for b, r in enumerate(requests) if r.params.prompt_logprobs is not None]
    return rows, max((requests[b].params.prompt_logprobs for b in rows), default=0)
