"""Rotary position embedding (neox rotate-half, optional partial rotary) in one pass.

Why: the eager reference materialises rotate_half(x) (a slice, a negation and a cat), two
products and a sum, plus slicing and another cat for partial rotary: ~6 kernels and as many
full-size temporaries for every q and k. Here each program reads a block of one token's heads
once, as two contiguous half-width tiles (so loads stay vectorised), reads cos/sin once for
all those heads, and writes the rotated row once; the tail past the rotary width is copied.

Rounding mirrors `ops/rotary.py`: `x * cos` and `rotate_half(x) * sin` are each rounded to
the result dtype promote(x, cos, sin) before they are added (torch evaluates them as separate
ops), so bf16 results agree with the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, needs_autograd, next_pow2

BLOCK_ELEMENTS = 2048           # heads per program = this / padded head_dim


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, H, D, R, HALF,
                   sx_m, sx_h, sx_d, sc_m, sc_r, ss_m, ss_r, so_m, so_h,
                   ROUND: tl.constexpr, HAS_TAIL: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
    hmask = heads < H
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF
    mask = hmask & jmask[None, :]
    row = x_ptr + m * sx_m + heads * sx_h
    out = o_ptr + m * so_m + heads * so_h
    # The two halves of the rotary width as separate contiguous tiles (no gather).
    x1 = tl.load(row + j[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + (j + HALF)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + m * sc_m + j * sc_r, mask=jmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + m * sc_m + (j + HALF) * sc_r, mask=jmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + m * ss_m + j * ss_r, mask=jmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + m * ss_m + (j + HALF) * ss_r, mask=jmask, other=0.0).to(tl.float32)[None, :]
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    a1, b1 = x1 * c1, -x2 * s1
    a2, b2 = x2 * c2, x1 * s2
    if ROUND:
        a1 = a1.to(o_ptr.dtype.element_ty).to(tl.float32)
        b1 = b1.to(o_ptr.dtype.element_ty).to(tl.float32)
        a2 = a2.to(o_ptr.dtype.element_ty).to(tl.float32)
        b2 = b2.to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out + j[None, :], (a1 + b1).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(out + (j + HALF)[None, :], (a2 + b2).to(o_ptr.dtype.element_ty), mask=mask)
    if HAS_TAIL:                                                   # partial rotary: copy dims R..D-1
        tcols = R + tl.arange(0, BLOCK_TAIL)
        tmask = hmask & (tcols < D)[None, :]
        xt = tl.load(row + tcols[None, :] * sx_d, mask=tmask, other=0.0)
        tl.store(out + tcols[None, :], xt.to(o_ptr.dtype.element_ty), mask=tmask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """`ops.apply_rotary`: x [..., H, D] rotated by cos/sin [..., R] (R even, R <= D)."""
    rot = cos.shape[-1] if cos.dim() else 0
    lead = tuple(x.shape[:-2])
    ok = (x.dim() >= 2 and x.numel() > 0 and sin.shape[-1:] == cos.shape[-1:] and 0 < rot <= x.shape[-1]
          and rot % 2 == 0 and floats(x, cos, sin) and not needs_autograd(x, cos, sin))
    if ok:
        try:
            ok = (torch.broadcast_shapes(cos.shape, lead + (rot,)) == lead + (rot,)
                  and torch.broadcast_shapes(sin.shape, lead + (rot,)) == lead + (rot,))
        except RuntimeError:
            ok = False
    if not ok:
        from ops.rotary import apply_rotary as ref
        return ref.reference(x, cos, sin)
    h, d = x.shape[-2:]
    x3 = x.reshape(-1, h, d)
    c2 = cos.expand(lead + (rot,)).reshape(-1, rot)
    s2 = sin.expand(lead + (rot,)).reshape(-1, rot)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    o3 = out.view(-1, h, d)
    block_half = next_pow2(rot // 2)
    block_h = min(next_pow2(h), max(BLOCK_ELEMENTS // (2 * block_half), 1))
    with device_guard(x):
        _rotary_kernel[(x3.shape[0], triton.cdiv(h, block_h))](
            x3, c2, s2, o3, h, d, rot, rot // 2,
            x3.stride(0), x3.stride(1), x3.stride(2), c2.stride(0), c2.stride(1), s2.stride(0), s2.stride(1),
            o3.stride(0), o3.stride(1),
            ROUND=out_dtype != torch.float32, HAS_TAIL=rot < d, BLOCK_H=block_h, BLOCK_HALF=block_half,
            BLOCK_TAIL=next_pow2(d - rot), num_warps=4)
    return out
