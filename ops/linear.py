"""Dense projection `x @ weight.T + bias`: every matmul of the target's forward.

Why an op rather than `nn.Linear`: speculation is lossless at T=0 only if a verify forward
(K + 1 rows per request) computes each row exactly as a 1-row decode step does. cuBLAS picks
its kernel, tiling and split-K by the row count, so in bf16 the same row rounds differently
in the two launches and near-ties flip (BENCHMARKS.md, "bf16 exactness"). The CUDA backend
(`ops/backends/triton_kernels/matmul.py`) keeps one reduction order whatever the row count.
The reference is `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatching


@dispatching("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N], in x's dtype."""
    return F.linear(x, weight, bias)
