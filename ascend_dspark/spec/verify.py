"""Lossless chain verification (speculative sampling), vectorised over the batch.

The rule is the one from Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023
(arXiv 2302.01318). A draft token x was drawn from q. Accept it with probability
min(1, p(x)/q(x)). At the first rejection, draw a replacement from norm(max(0, p - q)) and
stop. The emitted token is then distributed exactly as p:

    P(y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p, q)) * max(0, p(y) - q(y)) / sum_x max(0, p - q)
         = min(p(y), q(y)) + max(0, p(y) - q(y)) = p(y),

because 1 - sum min(p, q) = sum max(0, p - q). The identity only holds when q is the
distribution the draft was really drawn from. That is why the DSpark drafter passes on its
locally normalised distribution after temperature/top-k/top-p/min-p, and why p gets the
same transforms here (`SamplingBatch.probs`). Checking against any other q, such as raw
logits or a confidence-rescaled head, would bias the output without any sign of it.

Chains: each position gets its own coin u_k, and verification stops at the first
rejection. If every proposed draft is accepted, a bonus token comes from p at the next
position. DSpark's confidence scheduler can propose fewer drafts than were computed
(`verify_lens`). Positions past a request's verify length count as never proposed:
q = 0 there, so the residual at the stop index is simply p.

All randomness is counter-based (`sampling.uniform`, `sampling.exponential_race`), keyed
on (seed, absolute position, stream). That makes a seeded request reproducible in any
batch, and there is no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingBatch, Stream, exponential_race, uniform

# A residual with less mass than this is rounding noise (p == q up to float error). The
# rejection that would sample it has about this probability, so falling back to p costs
# nothing measurable. Same threshold as DeepSpec's `sample_residual`.
RESIDUAL_EPS = 1e-8


@dataclass
class VerifyResult:
    num_accepted: torch.Tensor   # [B] int64: accepted drafts, 0..verify_lens[b]
    tokens: torch.Tensor         # [B, K+1] int64: accepted drafts, then the correction/bonus
                                 # token at index num_accepted, then -1


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


def verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
           verify_lens: torch.Tensor, sampling: SamplingBatch,
           first_position: torch.Tensor) -> VerifyResult:
    """Verify a chain of drafts for every request in the batch at once.

    target_logits  [B, K+1, V]: row k is the target's distribution for the token at
                   first_position + k. Row K is the bonus position.
    draft_tokens   [B, K] int64. Entries past verify_lens are never read (they may be -1).
    draft_probs    [B, K, V]: the full distribution each draft was drawn from, after the
                   drafter's temperature/top-k/top-p/min-p (one-hot for greedy rows).
    verify_lens    [B] int64 in 0..K: how many leading drafts request b proposes.
    first_position [B] int64: absolute position of row 0 (keys the random streams).

    Greedy rows accept while draft == argmax(target_logits). Their correction or bonus
    is the argmax. An all-greedy batch takes a path with no random numbers at all.
    """
    batch, k_max = draft_tokens.shape
    device = draft_tokens.device
    first_position = first_position.long()
    verify_lens = verify_lens.long().clamp(0, k_max)
    proposed = torch.arange(k_max, device=device) < verify_lens.unsqueeze(1)      # [B, K]

    if sampling.all_greedy:
        target_argmax = target_logits.argmax(-1)                                   # [B, K+1]
        num_accepted = _leading_true(proposed & (draft_tokens == target_argmax[:, :k_max]))
        final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        return _assemble(draft_tokens, num_accepted, final)

    p = sampling.probs(target_logits)                                              # [B, K+1, V]
    vocab = p.shape[-1]
    drafts = draft_tokens.clamp_min(0).unsqueeze(-1)                               # -1 padding safe
    p_token = p[:, :k_max].gather(-1, drafts).squeeze(-1)                          # [B, K]
    q_token = draft_probs.gather(-1, drafts).squeeze(-1).float()
    positions = first_position.unsqueeze(1) + torch.arange(k_max, device=device)
    coin = uniform(sampling.seeds, positions, Stream.ACCEPT)
    accepted = coin < acceptance_probability(p_token, q_token)
    if sampling.any_greedy:
        target_argmax = target_logits.argmax(-1)
        greedy_accept = draft_tokens == target_argmax[:, :k_max]
        accepted = torch.where(sampling.greedy.unsqueeze(1), greedy_accept, accepted)
    num_accepted = _leading_true(proposed & accepted)

    # Stop index a = num_accepted. A rejection (a < verify_len) samples the residual
    # against q_a. The bonus (a == verify_len) uses q = 0, i.e. samples p_a.
    stop = num_accepted.view(batch, 1, 1).expand(batch, 1, vocab)
    p_stop = p.gather(1, stop).squeeze(1)                                          # [B, V]
    if k_max > 0:
        q_stop = draft_probs.gather(1, stop.clamp(max=k_max - 1)).squeeze(1).float()
        rejected = (num_accepted < verify_lens).unsqueeze(1)
        q_stop = torch.where(rejected, q_stop, torch.zeros_like(q_stop))
    else:
        q_stop = torch.zeros_like(p_stop)
    final = exponential_race(residual_distribution(p_stop, q_stop), sampling.seeds,
                             first_position + num_accepted, Stream.TARGET)
    if sampling.any_greedy:
        greedy_final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        final = torch.where(sampling.greedy, greedy_final, final)
    return _assemble(draft_tokens, num_accepted, final)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Length of the all-True prefix of each row of a [B, K] bool mask (0 for K = 0)."""
    return mask.long().cumprod(-1).sum(-1)


def _assemble(draft_tokens: torch.Tensor, num_accepted: torch.Tensor,
              final: torch.Tensor) -> VerifyResult:
    """[B, K+1] tokens: drafts before num_accepted, `final` at it, -1 after."""
    batch, k_max = draft_tokens.shape
    index = torch.arange(k_max + 1, device=draft_tokens.device).unsqueeze(0)
    stop = num_accepted.unsqueeze(1)
    pad = torch.full((batch, 1), -1, dtype=torch.long, device=draft_tokens.device)
    drafts = torch.cat([draft_tokens.long(), pad], dim=1)
    tokens = torch.where(index < stop, drafts,
                         torch.where(index == stop, final.long().unsqueeze(1), torch.full_like(drafts, -1)))
    return VerifyResult(num_accepted=num_accepted, tokens=tokens)
