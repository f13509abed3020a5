"""Gated MLP activations, silu(gate) * up and gelu_tanh(gate) * up, in one pass.

Why: eager torch writes the activated gate to memory and reads it back for the multiply
(two kernels, three reads + two writes of an [rows, intermediate] tensor). Fused, gate and
up are read once and the product written once. Rows may be strided (e.g. the two halves of
a merged gate/up projection) without a copy.

Rounding mirrors `ops/activation.py`: the activation is computed in fp32, rounded to gate's
dtype (what F.silu / F.gelu return), then multiplied by up in fp32 and rounded to
promote(gate, up). gelu_tanh uses the identity 0.5 * (1 + tanh(z)) == sigmoid(2z), which is
the same function without the cancellation of 1 + tanh(z) for negative inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, needs_autograd, next_pow2, rows_2d

BLOCK_COLS = 1024
SILU, GELU_TANH = 0, 1


@triton.jit
def _gated_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o,
                  ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)        # sqrt(2/pi) * (x + 0.044715 x^3)
        a = g * tl.sigmoid(2.0 * z)
    a = a.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (a * u).to(o_ptr.dtype.element_ty), mask=mask)


def _gated(act: int, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    if (gate.shape != up.shape or gate.dim() == 0 or gate.numel() == 0 or not floats(gate, up)
            or needs_autograd(gate, up)):
        return None
    n = gate.shape[-1]
    g2, u2 = rows_2d(gate, n), rows_2d(up, n)
    if out is None:
        out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    o2 = out.view(-1, n)
    block_n = min(BLOCK_COLS, next_pow2(n))
    with device_guard(gate):
        _gated_kernel[(g2.shape[0], triton.cdiv(n, block_n))](
            g2, u2, o2, n, g2.stride(0), u2.stride(0), o2.stride(0),
            ACT=act, BLOCK_N=block_n, num_warps=4)
    return out


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`ops.silu_and_mul` in one kernel."""
    res = _gated(SILU, gate, up, out)
    if res is None:
        from ops.activation import silu_and_mul as ref
        return ref.reference(gate, up)
    return res


def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`ops.gelu_tanh_and_mul` in one kernel."""
    res = _gated(GELU_TANH, gate, up, out)
    if res is None:
        from ops.activation import gelu_tanh_and_mul as ref
        return ref.reference(gate, up)
    return res
