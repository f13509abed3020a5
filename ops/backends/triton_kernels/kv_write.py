"""KV-cache write: scatter k and v rows into the paged cache in one launch.

Why: the eager reference flattens, casts and runs two `index_copy_`s: several small kernels
per layer per step, which dominate at decode sizes. Here one program per (token, head block)
reads its flat cache row from the slot mapping and copies that token's K and V rows straight
into place (cast to the cache dtype). Padding tokens already carry distinct scratch rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, next_pow2

BLOCK_ELEMENTS = 2048           # heads per program = this / padded head_dim


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, rows_ptr, T, H, D,
                     sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                     skc_r, skc_h, skc_d, svc_r, svc_h, svc_d, sr_b, sr_t,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    row = tl.load(rows_ptr + b * sr_b + t * sr_t).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (cols < D)
    k = tl.load(k_ptr + b * sk_b + t * sk_t + heads * sk_h + cols * sk_d, mask=mask)
    v = tl.load(v_ptr + b * sv_b + t * sv_t + heads * sv_h + cols * sv_d, mask=mask)
    tl.store(kc_ptr + row * skc_r + heads * skc_h + cols * skc_d, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + row * svc_r + heads * svc_h + cols * svc_d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """`ops.kv_write`: k, v [B, T, Hkv, D] -> paged caches [blocks, block_size, Hkv, D] at flat rows."""
    if (k.dim() != 4 or k.shape != v.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape
            or k.shape[2:] != k_cache.shape[2:] or slot_mapping.shape != k.shape[:2]
            or not k_cache.is_contiguous() or not v_cache.is_contiguous() or not floats(k, v, k_cache, v_cache)):
        from ops.kv_cache import kv_write as ref
        return ref.reference(k_cache, v_cache, k, v, slot_mapping)
    bsz, t, h, d = k.shape
    if bsz * t == 0:
        return None
    kc = k_cache.view(-1, h, d)
    vc = v_cache.view(-1, h, d)
    block_d = next_pow2(d)
    block_h = min(next_pow2(h), max(BLOCK_ELEMENTS // block_d, 1))
    with device_guard(k_cache):
        _kv_write_kernel[(bsz * t, triton.cdiv(h, block_h))](
            k, v, kc, vc, slot_mapping, t, h, d,
            *k.stride(), *v.stride(), *kc.stride(), *vc.stride(), *slot_mapping.stride(),
            BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return None
