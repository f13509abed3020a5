"""Model-shaped cases shared by the reference-op and Triton-op tests.

Each case is one architecture's per-layer sizes: hidden, heads / KV heads, head_dim,
rotary width, intermediate size, norm offset (Gemma's x * (1 + w)) and activation. Row
counts stay small: the interpreter runs one Python program per kernel instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Case:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    intermediate: int
    offset: float = 0.0
    act: str = "silu"
    eps: float = 1e-6

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("smollm2", hidden=576, heads=9, kv_heads=3, head_dim=64, rotary_dim=64, intermediate=1536, eps=1e-5),
    Case("qwen3_8b", hidden=4096, heads=32, kv_heads=8, head_dim=128, rotary_dim=128, intermediate=12288),
    Case("gemma3_1b", hidden=1152, heads=4, kv_heads=1, head_dim=256, rotary_dim=256, intermediate=6912,
         offset=1.0, act="gelu_tanh"),
    # Odd sizes: non-power-of-two everything, partial rotary (the tail of each head passes through).
    Case("odd", hidden=77, heads=3, kv_heads=1, head_dim=10, rotary_dim=6, intermediate=45, offset=1.0,
         act="gelu_tanh"),
]
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# Tolerances of a computed op against an independent float64 formula. bf16 has an 8-bit
# significand (relative spacing 2^-8 .. 2^-7); the reference rounds intermediate results to
# the working dtype two or three times, so a few ulps of bf16 are allowed.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
# A fused kernel against the reference op (same rounding points; only the fp32 arithmetic
# order, exp/rsqrt approximations, and under the interpreter truncating bf16 casts differ).
# Allows about two ulps of the output dtype.
KERNEL_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


def randn(*shape: int, dtype=torch.float32, device="cpu", gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def norm_weight(case: Case, dim: int, dtype, device="cpu", gen=None) -> torch.Tensor:
    """Weights around the identity of each convention (1 for x*w, 0 for Gemma's x*(1+w))."""
    w = 0.1 * torch.randn(dim, generator=gen)
    return (w if case.offset else 1.0 + w).to(device=device, dtype=dtype)


def inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
