"""Ascend (torch_npu) implementations of the sampling ops. Imported by ops/backends/npu.py.

`top_k_top_p` -> `torch_npu.npu_top_k_top_p(logits, p=None, k=None)` (schema from 2.6.0.post3 on:
`npu_top_k_top_p(Tensor logits, Tensor? p=None, Tensor? k=None) -> Tensor`; torch_npu 2.6.0
has `(Tensor logits, Tensor p, Tensor k)`, both required: there an unused filter is passed as
its no-op value, p = 1 / k = V, decided from the schema by ops/backends/npu_caps.py), after
the temperature division in float32. The kernel's constraints (shared/reference/ascend.md):
logits 2-D; k int32 [rows] with every value in 1..1024 and <= V; p [rows] in the dtype of
the logits. So:

- [B, ..., V] logits are flattened to [B * S, V] and the per-request k / p repeated S times;
- the logits handed over are float32 (as the reference computes), so p is float32 too and
  keeps its exact value (p cast to bf16 would move 0.9 to 0.8984);
- "top_k disabled" (0) and k >= V both mean "keep all" = k = V, which the kernel accepts
  when V <= 1024. For a larger vocabulary, a batch with a row whose k is 0 or > 1024 cannot
  be expressed, and the whole call falls back to the reference. Whether that happens is
  decided from the host-side `top_k_bounds` the caller knows when it builds the batch
  (never by reading top_k back from the device); without bounds the reference runs.

Differences from the reference, both outside what a continuous distribution can see:
the kernel keeps every token tied with the k-th value (the reference keeps exactly k), and
for a row with p = 1 it sets to -inf tokens whose probability underflows to exactly 0
(the reference leaves their logits alone); their probability is 0 either way.
"""

from __future__ import annotations

import torch
import torch_npu

from ..registry import register
from ..sampling import TOP_K_KERNEL_LIMIT, apply_temperature_top_k_top_p
from .npu_caps import Capabilities

NPU_MAX_TOP_K = TOP_K_KERNEL_LIMIT
CAPS = Capabilities.probe(torch_npu)


def top_k_in_kernel_range(vocab: int, top_k_bounds: tuple[int, int] | None) -> bool:
    """Whether every row's k (0 = all) can be handed to npu_top_k_top_p for this vocab."""
    if vocab <= NPU_MAX_TOP_K:
        return True                  # 0 and k > V become k = V, inside 1..1024
    return top_k_bounds is not None and top_k_bounds[0] >= 1 and top_k_bounds[1] <= NPU_MAX_TOP_K


@register("top_k_top_p", "npu")
def apply_temperature_top_k_top_p_npu(logits: torch.Tensor, temperature: torch.Tensor,
                                      top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                                      *, top_k_bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """`ops.sampling.apply_temperature_top_k_top_p` on torch_npu's fused filter."""
    vocab = logits.shape[-1]
    if "top_k_top_p" in CAPS.refused or (top_k is not None and not top_k_in_kernel_range(vocab, top_k_bounds)) \
            or (top_k is None and top_p is not None and not CAPS.top_k_top_p_optional and vocab > NPU_MAX_TOP_K):
        return apply_temperature_top_k_top_p.reference(logits, temperature, top_k, top_p,
                                                       top_k_bounds=top_k_bounds)
    scaled = logits.float() / temperature.view(-1, *([1] * (logits.dim() - 1)))
    if (top_k is None and top_p is None) or scaled.numel() == 0:
        return scaled
    batch = scaled.shape[0]
    flat = scaled.reshape(-1, vocab)
    per_row = flat.shape[0] // batch

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, 1).expand(batch, per_row).reshape(-1)

    k = None
    if top_k is not None:
        k = top_k.long()
        k = torch.where((k > 0) & (k < vocab), k, torch.full_like(k, vocab))
        k = repeat(k).to(torch.int32)
    p = repeat(top_p).to(flat.dtype) if top_p is not None else None
    if not CAPS.top_k_top_p_optional:  # p and k both required (2.6.0): the unused one keeps every token
        if k is None:
            k = torch.full((flat.shape[0],), vocab, dtype=torch.int32, device=flat.device)
        if p is None:
            p = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
    return torch_npu.npu_top_k_top_p(flat, p=p, k=k).view_as(scaled)
