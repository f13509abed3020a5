"""Paged attention: new queries over K/V read straight from the block-table cache.

Why: the reference gathers every row's blocks into a contiguous [B, S, Hkv, D] copy per
layer and step, then runs SDPA over all S keys. Under graph replay S is the whole table
(every row's view is fixed to `max_model_len` + lookahead), so that copy costs the table's
width for every row, however short its context. This kernel reads each key block in place
through the table, and stops at the last key any of its queries may see: a row's step
costs its own context.

One program per (query tile, row, KV head): the tile holds `BLOCK_M` (token, query head)
pairs of one KV head's group (16, whatever the chunk: a tile's shape decides how its
row sums are reduced across warps, so a fixed shape gives a query the same bits in a 1-token
decode, a verify step and a prefill; key tiles a query cannot see add exactly nothing) (GQA without repeating K/V), runs an online softmax over key
tiles of `BLOCK_N`, and applies the op's boolean mask, so causal verification,
DFlash/DSpark block masks and sliding windows are all the same code. Fixed shapes, no host
reads: it captures into CUDA graphs like the reference. bf16 / fp16 multiply on tensor
cores with fp32 accumulation (as SDPA does); fp32 and Triton's interpreter (which has no
bf16 matmul) use exact fp32 products.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops.context import ForwardContext

from ._common import device_guard, floats, needs_autograd, next_pow2

MAX_HEAD_DIM = 256
QUERY_TILE = 16                  # (token, head) pairs per program, fixed: see the module docstring
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_tile(q, m_i, l_i, acc, start, hi, b, kv_head, t, row_ok, d, d_ok, scale,
                 kc_ptr, vc_ptr, table_ptr, mask_ptr, skc_r, skc_h, skc_d, svc_r, svc_h, svc_d,
                 st_b, st_n, sm_b, sm_t, sm_s,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_MATH: tl.constexpr):
    """One key tile of the online softmax: keys start .. start + BLOCK_N (none at or past hi)."""
    s = start + tl.arange(0, BLOCK_N)
    s_ok = s < hi
    block = tl.load(table_ptr + b * st_b + (s // PAGE) * st_n, mask=s_ok, other=0).to(tl.int64)
    rows = block * PAGE + s % PAGE
    kv_mask = s_ok[:, None] & d_ok[None, :]
    k = tl.load(kc_ptr + rows[:, None] * skc_r + kv_head * skc_h + d[None, :] * skc_d, mask=kv_mask, other=0.0)
    v = tl.load(vc_ptr + rows[:, None] * svc_r + kv_head * svc_h + d[None, :] * svc_d, mask=kv_mask, other=0.0)
    if FP32_MATH:
        scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k.to(q.dtype)))
    visible = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + s[None, :] * sm_s,
                      mask=row_ok[:, None] & s_ok[None, :], other=0) != 0
    scores = tl.where(visible, scores * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # a row that sees nothing yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_MATH:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, mask_ptr, reach_ptr, out_ptr,
                            T, G, D, scale,
                            sq_b, sq_t, sq_h, sq_d, skc_r, skc_h, skc_d, svc_r, svc_h, svc_d,
                            st_b, st_n, sm_b, sm_t, sm_s, sr_b, sr_t, so_b, so_t, so_h, so_d,
                            PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, FP32_MATH: tl.constexpr, INTERPRETED_KEYS: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2).to(tl.int64)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < T * G
    t = (m // G).to(tl.int64)
    head = kv_head * G + (m % G)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # The furthest key any query of this tile may see: keys past it are never read.
    hi = tl.max(tl.load(reach_ptr + b * sr_b + t * sr_t, mask=row_ok, other=0), axis=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    args = (b, kv_head, t, row_ok, d, d_ok, scale, kc_ptr, vc_ptr, table_ptr, mask_ptr,
            skc_r, skc_h, skc_d, svc_r, svc_h, svc_d, st_b, st_n, sm_b, sm_t, sm_s)
    if INTERPRETED_KEYS:
        # Triton's interpreter (with NumPy >= 2.4) cannot take a loop bound from a runtime
        # value: there the loop runs to the mask's width, a constant (loads still stop at hi).
        for start in range(0, INTERPRETED_KEYS, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, *args, PAGE, BLOCK_N, FP32_MATH)
    else:
        for start in range(0, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, *args, PAGE, BLOCK_N, FP32_MATH)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * so_b + t[:, None] * so_t + head[:, None] * so_h + d[None, :] * so_d,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def query_reach(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] int32: 1 + the last key each query may see (0 when it sees none)."""
    keys = torch.arange(1, mask.shape[-1] + 1, dtype=torch.int32, device=mask.device)
    return torch.where(mask[:, 0], keys, 0).amax(-1).to(torch.int32)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              mask: torch.Tensor, scale: float, ctx: ForwardContext | None = None) -> torch.Tensor:
    """`ops.attention`: q [B, T, Hq, D] over the paged caches [blocks, page, Hkv, D] through
    block_table [B, nb], with mask [B, 1, T, S]. The layers of one forward share their mask:
    with a forward context its reach is computed once per forward, not once per layer."""
    bsz, t, hq, d = q.shape
    hkv = k_cache.shape[2]
    if (k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != d or hq % hkv
            or d > MAX_HEAD_DIM or mask.dtype != torch.bool or mask.shape[:3] != (bsz, 1, t)
            or block_table.shape[0] != bsz or mask.shape[-1] > block_table.shape[1] * k_cache.shape[1]
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or not floats(q, k_cache, v_cache) or needs_autograd(q, k_cache, v_cache)):
        from ops.attention import attention as ref
        return ref.reference(q, k_cache, v_cache, block_table, mask, scale, ctx)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    page = k_cache.shape[1]
    group = hq // hkv
    kc, vc = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    reach = query_reach(mask) if ctx is None else ctx.derived(mask, query_reach)
    block_d = max(next_pow2(d), 16)
    block_m = QUERY_TILE
    block_n = 64 if block_d <= 128 else 32
    grid = (triton.cdiv(t * group, block_m), bsz, hkv)
    with device_guard(q):
        _paged_attention_kernel[grid](
            q, kc, vc, block_table, mask, reach, out, t, group, d, float(scale),
            *q.stride(), *kc.stride(), *vc.stride(), *block_table.stride(), mask.stride(0), mask.stride(2),
            mask.stride(3), *reach.stride(), *out.stride(),
            PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            FP32_MATH=q.dtype == torch.float32 or INTERPRETED,
            INTERPRETED_KEYS=mask.shape[-1] if INTERPRETED else 0, num_warps=4)
    return out
