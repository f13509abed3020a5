"""KV-cache write into the paged cache.

Cache layout per layer: [physical_blocks, block_size, num_kv_heads, head_dim] (Ascend's ND
paged layout). `slot_mapping[b, t]` is the flat row (block * block_size + offset) token
(b, t) writes; the caller (`BlockTables.slot_mapping`) gives padding tokens distinct scratch
rows, so a ragged batch never clobbers real entries, no two tokens share a row, and shapes
stay static.
"""

from __future__ import annotations

import torch

from .registry import dispatching


@dispatching("kv_write")
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [B, T, Hkv, D] at the flat cache rows slot_mapping [B, T]."""
    rows = slot_mapping.reshape(-1)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, rows, k.reshape(-1, *k.shape[2:]).to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, rows, v.reshape(-1, *v.shape[2:]).to(v_cache.dtype))
