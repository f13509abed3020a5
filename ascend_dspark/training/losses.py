"""Loss terms of DeepSpec's recipe, as pure functions of logits, target probabilities and masks.

Every term is a weighted sum over the supervised positions, returned as a `Term`
(numerator, denominator) instead of a mean: the trainer divides by the denominator summed
over the whole *global* batch (all data-parallel ranks), which is what DeepSpec's
`sum(w * loss) / sum(w)` over the global batch means, and what makes N ranks equal one
process on the same global batch.

Conventions: logits and probabilities are float32 [..., V]; `weight` [...] is zero where
a position is not supervised; the target distribution `p_target` is the target's own
next-token distribution at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Term:
    numerator: torch.Tensor        # scalar, differentiable
    denominator: torch.Tensor      # scalar, no gradient

    def mean(self, global_denominator: torch.Tensor | None = None) -> torch.Tensor:
        den = self.denominator if global_denominator is None else global_denominator
        return self.numerator / den.clamp(min=1e-12)


def position_weights(num_slots: int, decay: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """w_k = exp(-k / decay) for block slot k = 0..num_slots-1 (DeepSpec `loss_decay_gamma`;
    the paper writes exp(-(k-1)/gamma) with k from 1). decay <= 0 means uniform weights."""
    k = torch.arange(num_slots, dtype=torch.float32, device=device)
    return torch.exp(-k / decay) if decay > 0 else torch.ones_like(k)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> Term:
    """sum(w * -log softmax(logits)[label]); labels outside [0, V) must carry w = 0."""
    safe = labels.clamp(0, logits.shape[-1] - 1)
    nll = F.cross_entropy(logits.flatten(0, -2), safe.flatten(), reduction="none").view(labels.shape)
    return weighted(nll, weight)


def soft_cross_entropy(logits: torch.Tensor, p_target: torch.Tensor, weight: torch.Tensor) -> Term:
    """sum(w * -sum_v p_target(v) log softmax(logits)(v)): EAGLE-3's loss against the
    target's full distribution."""
    ce = -(p_target * torch.log_softmax(logits, dim=-1)).sum(-1)
    return weighted(ce, weight)


def l1_distance(p_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """||p_draft - p_target||_1 per position: twice the total variation. The per-step
    acceptance of rejection sampling is 1 - ||.||_1 / 2 (Leviathan et al.)."""
    return (p_draft - p_target).abs().sum(-1)


def confidence_bce(confidence_logit: torch.Tensor, accept_rate: torch.Tensor, weight: torch.Tensor) -> Term:
    """BCE of the confidence head against the soft label c* = 1 - TV (detached, paper Eq. 8, 11)."""
    bce = F.binary_cross_entropy_with_logits(confidence_logit.float(), accept_rate.detach().clamp(0, 1),
                                             reduction="none")
    return weighted(bce, weight)


def expected_accepted_length(accept_rate: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """DeepSpec's `tau_probabilistic` = 1 + sum_k prod_{i<=k} a_i with a_k the batch mean of
    the analytic acceptance 1 - TV at slot k (teacher forced). accept_rate, valid: [N, K]."""
    per_slot = (accept_rate * valid).sum(0) / valid.sum(0).clamp(min=1)
    return 1 + torch.cumprod(per_slot, 0).sum()


def weighted(values: torch.Tensor, weight: torch.Tensor) -> Term:
    weight = weight.to(values.dtype)
    return Term((values * weight).sum(), weight.sum().detach())
