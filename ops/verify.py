"""The chain-verification step of speculative sampling, vectorised over the batch.

Rule (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318): draft
x ~ q is accepted with probability min(1, p(x)/q(x)); at the first rejection a replacement
is drawn from norm(max(0, p - q)) and the chain stops; when every proposed draft is
accepted a bonus token is drawn from p at the next position. `ascend_dspark.spec.verify`
explains why this is lossless, and owns which random numbers are used (seeds, positions,
streams); these ops own the maths.

`acceptance_probability` and `residual_distribution` are the two rules. `verify_chain`
takes them as arguments (defaulting to these) so that a test can swap in a wrong rule and
check the statistics catch it; a backend that fuses the rules must run
`verify_chain.reference` when it is handed any other function.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import dispatching
from .sampling import counter_uniform_vocab, exponential_race

# A residual with less mass than this is rounding noise (p == q up to float error). The
# rejection that would sample it has about this probability, so falling back to p costs
# nothing measurable. Same threshold as DeepSpec's `sample_residual`.
RESIDUAL_EPS = 1e-8


def acceptance_probability(p_token: torch.Tensor, q_token: torch.Tensor) -> torch.Tensor:
    """min(1, p/q), elementwise, where p and q are the probabilities of the drafted token.

    A drafted token cannot really have q = 0. If it does (q rounded to zero in a
    low-precision copy), the ratio is infinite and the token is accepted when p > 0. When
    p = 0 it is rejected, so the verifier never emits a token the target forbids.
    """
    return torch.where(p_token >= q_token, (p_token > 0).to(p_token.dtype), p_token / q_token)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim, or p where the residual has no mass.

    This is the distribution to sample after a rejection. It puts back exactly the mass
    the accepted drafts under-cover. With q = 0 (nothing proposed) it is p, which is how
    bonus tokens and K = 0 decoding reuse this path.
    """
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > RESIDUAL_EPS, r / mass.clamp_min(RESIDUAL_EPS), p)


@dispatching("verify_chain")
def verify_chain(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                 verify_lens: torch.Tensor, accept_uniform: torch.Tensor, seeds: torch.Tensor,
                 first_position: torch.Tensor, residual_stream: int, greedy: torch.Tensor | None = None,
                 *, acceptance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = acceptance_probability,
                 residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = residual_distribution,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sample a chain of drafts per row; returns (num_accepted [B], tokens [B, K+1]).

    target_probs   [B, K+1, V] float: p at each draft position, then the bonus position
                   (one-hot on the argmax for greedy rows).
    draft_tokens   [B, K] int64; entries at or past verify_lens are never read (may be -1).
    draft_probs    [B, K, V]: the distribution each draft was drawn from.
    verify_lens    [B] int in 0..K: how many leading drafts each row proposes. Positions
                   past it count as never proposed (q = 0: the residual there is p).
    accept_uniform [B, K] float32 in (0, 1): the acceptance coins.
    seeds, first_position [B] int64, residual_stream: key of the residual / bonus noise. The
                   replacement at stop index a = num_accepted is an exponential race
                   with `counter_uniform_vocab(seeds, first_position + a, residual_stream, V)`,
                   generated here because a is only known on the device.
    greedy         [B] bool or None: rows that accept while draft == argmax(p) and emit
                   the argmax (the same as the sampled rule on a one-hot p, kept exact).

    num_accepted is int64 in 0..verify_lens[b]; tokens holds the accepted drafts, the
    correction / bonus token at index num_accepted, then -1.
    """
    batch, k_max = draft_tokens.shape
    device = draft_tokens.device
    vocab = target_probs.shape[-1]
    verify_lens = verify_lens.long().clamp(0, k_max)
    proposed = torch.arange(k_max, device=device) < verify_lens.unsqueeze(1)            # [B, K]

    drafts = draft_tokens.long().clamp_min(0).unsqueeze(-1)                             # -1 padding safe
    p_token = target_probs[:, :k_max].gather(-1, drafts).squeeze(-1)                    # [B, K]
    q_token = draft_probs.gather(-1, drafts).squeeze(-1).float()
    accepted = accept_uniform < acceptance(p_token, q_token)
    if greedy is not None:
        target_argmax = target_probs.argmax(-1)                                         # [B, K+1]
        greedy_accept = draft_tokens == target_argmax[:, :k_max]
        accepted = torch.where(greedy.unsqueeze(1), greedy_accept, accepted)
    num_accepted = _leading_true(proposed & accepted)

    # Stop index a = num_accepted. A rejection (a < verify_len) samples the residual
    # against q_a. The bonus (a == verify_len) uses q = 0, i.e. samples p_a.
    stop = num_accepted.view(batch, 1, 1).expand(batch, 1, vocab)
    p_stop = target_probs.gather(1, stop).squeeze(1)                                    # [B, V]
    if k_max > 0:
        q_stop = draft_probs.gather(1, stop.clamp(max=k_max - 1)).squeeze(1).float()
        rejected = (num_accepted < verify_lens).unsqueeze(1)
        q_stop = torch.where(rejected, q_stop, torch.zeros_like(q_stop))
    else:
        q_stop = torch.zeros_like(p_stop)
    # References only inside a reference: the platform's registry chose this implementation.
    noise = counter_uniform_vocab.reference(seeds, first_position.long() + num_accepted, residual_stream, vocab)
    final = exponential_race.reference(residual(p_stop, q_stop), noise)
    if greedy is not None:
        greedy_final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        final = torch.where(greedy, greedy_final, final)
    return num_accepted, _assemble(draft_tokens, num_accepted, final)


@dispatching("verify_chain_greedy")
def verify_chain_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                        verify_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy chain verification: accept while draft == argmax(target_logits); the
    correction / bonus is the argmax at the stop index. No random numbers.

    target_logits [B, K+1, V] (any scores whose argmax is the greedy token);
    draft_tokens [B, K] int64; verify_lens [B] in 0..K.
    Returns (num_accepted [B] int64, tokens [B, K+1] int64) as `verify_chain`.
    """
    k_max = draft_tokens.shape[1]
    verify_lens = verify_lens.long().clamp(0, k_max)
    proposed = torch.arange(k_max, device=draft_tokens.device) < verify_lens.unsqueeze(1)
    target_argmax = target_logits.argmax(-1)                                            # [B, K+1]
    num_accepted = _leading_true(proposed & (draft_tokens == target_argmax[:, :k_max]))
    final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, _assemble(draft_tokens, num_accepted, final)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Length of the all-True prefix of each row of a [B, K] bool mask (0 for K = 0)."""
    return mask.long().cumprod(-1).sum(-1)


def _assemble(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """[B, K+1] int64 tokens: drafts before num_accepted, `final` at it, -1 after."""
    batch, k_max = draft_tokens.shape
    index = torch.arange(k_max + 1, device=draft_tokens.device).unsqueeze(0)
    stop = num_accepted.unsqueeze(1)
    pad = torch.full((batch, 1), -1, dtype=torch.long, device=draft_tokens.device)
    drafts = torch.cat([draft_tokens.long(), pad], dim=1)
    return torch.where(index < stop, drafts,
                       torch.where(index == stop, final.long().unsqueeze(1), torch.full_like(drafts, -1)))
