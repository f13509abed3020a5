"""RMSNorm and fused residual-add + RMSNorm.

`offset` is 0 for Llama/Qwen3 (`x * w`) and 1 for Gemma (`x * (1 + w)`). Statistics are
taken in float32 whatever the input dtype, as the reference implementations do.
"""

from __future__ import annotations

import torch

from .registry import dispatching


@dispatching("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


@dispatching("add_rms_norm")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual). A reference is built from references
    only: the platform's registry chose this implementation, so nothing inside re-dispatches."""
    summed = x + residual
    return rms_norm.reference(summed, weight, eps, offset), summed
