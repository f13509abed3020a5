"""Attention of new tokens over the static slot KV cache.

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
def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
              mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D] over keys 0..S-1 of the given slots ([slots, S+, Hkv, D] caches); mask [B, 1, T, S]."""
    num_keys = mask.shape[-1]
    k = k_cache[:, :num_keys].index_select(0, slot_ids).transpose(1, 2)
    v = v_cache[:, :num_keys].index_select(0, slot_ids).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[1],
    )
    return out.transpose(1, 2)
