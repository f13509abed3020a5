"""RMSNorm and fused residual-add + RMSNorm in one pass over each row.

Why: eager torch runs the reference as ~6 kernels (cast, pow, mean, rsqrt, mul, cast, mul)
with fp32 temporaries in between; `add_rms_norm` adds one more pass for the sum. Here each
row is read once (plus the residual), the statistics stay in registers, and the outputs
(and the sum) are written once: the op becomes a single memory-bound pass.

Rounding mirrors `ops/norm.py`: statistics in fp32; with offset == 0 the normalised row is
rounded to the input dtype before the weight multiply (HF Llama/Qwen3 order) and the result
has dtype promote(x, weight); with an offset (Gemma) `x * (offset + w)` is computed in fp32
and rounded once to x's dtype. The residual sum is rounded to promote(x, residual) before
the statistics, exactly like `x + residual` in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_FUSED_COLS, device_guard, floats, needs_autograd, next_pow2, rows_2d, warps_for

# Rows per program = this / padded row width (narrow rows share a program). It depends on the
# width only, never on the row count, so a row's reduction order -- and its bits -- are the
# same in a 1-token decode and a 16-token verification (batch invariance).
ROW_BLOCK_ELEMENTS = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, M, N,
                     stride_x, stride_r, stride_o, stride_s, eps, offset,
                     HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows * stride_s + cols[None, :], s, mask=mask)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    y = xf * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_OFFSET:
        out = y * (offset + w)
    else:
        if HAS_RESIDUAL:
            y = y.to(sum_ptr.dtype.element_ty).to(tl.float32)
        else:
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        out = y * w
    tl.store(out_ptr + rows * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _out_dtype(x_dtype: torch.dtype, weight: torch.Tensor, offset: float) -> torch.dtype:
    return x_dtype if offset else torch.promote_types(x_dtype, weight.dtype)


def _supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n = x.shape[-1] if x.dim() else 0
    return (x.dim() >= 1 and x.numel() > 0 and weight.dim() == 1 and weight.shape[0] == n
            and n <= MAX_FUSED_COLS and floats(x, weight) and not needs_autograd(x, weight))


def _launch(x2, r2, weight, out2, sum2, eps, offset):
    m, n = x2.shape
    block_n = next_pow2(n)
    block_m = max(ROW_BLOCK_ELEMENTS // block_n, 1)
    has_res = r2 is not None
    with device_guard(x2):
        _rms_norm_kernel[(triton.cdiv(m, block_m),)](
            x2, r2 if has_res else x2, weight.contiguous(), out2, sum2 if has_res else out2, m, n,
            x2.stride(0), r2.stride(0) if has_res else 0, out2.stride(0), sum2.stride(0) if has_res else 0,
            float(eps), float(offset), HAS_RESIDUAL=has_res, HAS_OFFSET=bool(offset),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """`ops.rms_norm` in one kernel; `out` (optional, contiguous, x's shape) receives the result."""
    if not _supported(x, weight):
        from ops.norm import rms_norm as ref
        return ref.reference(x, weight, eps, offset)
    n = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=_out_dtype(x.dtype, weight, offset), device=x.device)
    _launch(rows_2d(x, n), None, weight, out.view(-1, n), None, eps, offset)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0, *, out: torch.Tensor | None = None,
                 summed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.add_rms_norm`: (rms_norm(x + residual), x + residual), both written by one kernel."""
    if (x.shape != residual.shape or not _supported(x, weight) or not floats(residual)
            or needs_autograd(residual)):
        from ops.norm import add_rms_norm as ref
        return ref.reference(x, residual, weight, eps, offset)
    n = x.shape[-1]
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    if summed_out is None:
        summed_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if out is None:
        out = torch.empty(x.shape, dtype=_out_dtype(sum_dtype, weight, offset), device=x.device)
    _launch(rows_2d(x, n), rows_2d(residual, n), weight, out.view(-1, n), summed_out.view(-1, n), eps, offset)
    return out, summed_out
