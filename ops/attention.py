"""Attention of new tokens over the paged KV cache, through a block table.

One op covers every case the engine needs, through a per-query exclusive key limit:
- causal prefill / decode / verification: `kv_limit = position + 1`;
- DFlash/DSpark block drafting: every block query sees the cached context and the whole
  block, `kv_limit = anchor_position + block_size` (bidirectional inside the block);
- sliding-window layers (Gemma3) additionally hide keys at or before `position - window`.
GQA is handled by the kernel (no K/V repetition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import ForwardContext
from .registry import dispatching


def build_attention_mask(query_positions: torch.Tensor, kv_limit: torch.Tensor, num_keys: int,
                         window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask, True where query t may see key s."""
    keys = torch.arange(num_keys, device=kv_limit.device)
    visible = keys < kv_limit.unsqueeze(-1)
    if window is not None:
        visible = visible & (keys > (query_positions - window).unsqueeze(-1))
    return visible.unsqueeze(1)


@dispatching("attention")
def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              mask: torch.Tensor, scale: float, ctx: ForwardContext | None = None) -> torch.Tensor:
    """q [B, T, Hq, D] over keys 0..S-1 of each row's blocks; caches [blocks, block_size, Hkv, D],
    block_table [B, nb] (nb * block_size >= S), mask [B, 1, T, S]. `ctx`: the forward's
    host facts (ops/context.py), for kernels that want them; the reference needs none.

    The reference gathers each row's blocks into a contiguous [B, S, Hkv, D] copy; table
    entries past a request's blocks point at the never-written null block (finite zeros)."""
    b = block_table.shape[0]
    num_keys = mask.shape[-1]
    rows = block_table.reshape(-1).long()
    k = k_cache.index_select(0, rows).view(b, -1, *k_cache.shape[2:])[:, :num_keys].transpose(1, 2)
    v = v_cache.index_select(0, rows).view(b, -1, *v_cache.shape[2:])[:, :num_keys].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[1],
    )
    return out.transpose(1, 2)
