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

This module keeps the request-level side (which distribution p is, which seeds, positions
and streams key the noise); the vectorised step itself is the op `ops.verify_chain`
(`ops.verify_chain_greedy` for all-greedy batches), which device backends can replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The two rules live with the verification op. They are attributes of this module too and
# `verify` passes them to the op by name, so patching them here takes effect.
from ops.verify import acceptance_probability, residual_distribution

from .sampling import SamplingBatch, Stream, uniform


@dataclass
class VerifyResult:
    num_accepted: torch.Tensor   # [B] int64: accepted drafts, 0..verify_lens[b]
    tokens: torch.Tensor         # [B, K+1] int64: accepted drafts, then the correction/bonus
                                 # token at index num_accepted, then -1


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
    if sampling.all_greedy:
        num_accepted, tokens = sampling.ops.verify_chain_greedy(target_logits, draft_tokens, verify_lens)
        return VerifyResult(num_accepted=num_accepted, tokens=tokens)

    k_max = draft_tokens.shape[1]
    first_position = first_position.long()
    p = sampling.probs(target_logits)                                              # [B, K+1, V]
    positions = first_position.unsqueeze(1) + torch.arange(k_max, device=draft_tokens.device)
    coin = uniform(sampling.seeds, positions, Stream.ACCEPT, sampling.ops)         # [B, K]
    # The residual / bonus token at stop index a uses Stream.TARGET noise at first_position + a.
    num_accepted, tokens = sampling.ops.verify_chain(
        p, draft_tokens, draft_probs, verify_lens, coin, sampling.seeds, first_position, int(Stream.TARGET),
        sampling.greedy if sampling.any_greedy else None,
        acceptance=acceptance_probability, residual=residual_distribution)
    return VerifyResult(num_accepted=num_accepted, tokens=tokens)
