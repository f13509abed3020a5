"""KV-cache write: scatter k and v rows into the slot cache in one launch.

Why: the eager reference builds the scratch-redirected positions (where + full_like), expands
the slot ids and runs two advanced-indexing `index_put_`s (each with its own index
preparation and a dtype-cast copy): 5-7 small kernels per layer per step, which dominate at
decode sizes. Here one program per (token, head block) reads its slot, position and valid
flag, and copies that token's K and V rows straight into place (cast to the cache dtype).
Padding tokens (valid == False) go to the scratch position `capacity`, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, next_pow2

BLOCK_ELEMENTS = 2048           # heads per program = this / padded head_dim


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, valid_ptr, T, H, D, scratch,
                     sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                     skc_s, skc_p, skc_h, skc_d, svc_s, svc_p, svc_h, svc_d,
                     s_slot, sp_b, sp_t, sva_b, sva_t,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    slot = tl.load(slot_ptr + b * s_slot).to(tl.int64)
    pos = tl.load(pos_ptr + b * sp_b + t * sp_t).to(tl.int64)
    ok = tl.load(valid_ptr + b * sva_b + t * sva_t)
    pos = tl.where(ok != 0, pos, scratch)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (cols < D)
    k = tl.load(k_ptr + b * sk_b + t * sk_t + heads * sk_h + cols * sk_d, mask=mask)
    v = tl.load(v_ptr + b * sv_b + t * sv_t + heads * sv_h + cols * sv_d, mask=mask)
    tl.store(kc_ptr + slot * skc_s + pos * skc_p + heads * skc_h + cols * skc_d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + slot * svc_s + pos * svc_p + heads * svc_h + cols * svc_d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
    """`ops.kv_write`: k, v [B, T, Hkv, D] -> caches [slots, capacity + 1, Hkv, D] at (slot, position)."""
    if (k.dim() != 4 or k.shape != v.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape
            or k.shape[2:] != k_cache.shape[2:] or slot_ids.dim() != 1 or positions.dim() != 2
            or valid.shape != positions.shape or positions.shape != k.shape[:2] or slot_ids.shape[0] != k.shape[0]
            or not floats(k, v, k_cache, v_cache)):
        from ops.kv_cache import kv_write as ref
        return ref.reference(k_cache, v_cache, k, v, slot_ids, positions, valid)
    bsz, t, h, d = k.shape
    if bsz * t == 0:
        return None
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)          # same bytes; avoids i1 pointers
    block_d = next_pow2(d)
    block_h = min(next_pow2(h), max(BLOCK_ELEMENTS // block_d, 1))
    with device_guard(k_cache):
        _kv_write_kernel[(bsz * t, triton.cdiv(h, block_h))](
            k, v, k_cache, v_cache, slot_ids, positions, valid, t, h, d, k_cache.shape[1] - 1,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
            slot_ids.stride(0), *positions.stride(), *valid.stride(),
            BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return None
