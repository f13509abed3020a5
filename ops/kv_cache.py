"""KV-cache write into the static slot cache.

Cache layout per layer: [num_slots, capacity + 1, num_kv_heads, head_dim] ("BSND"), which
is also a paged cache of block size capacity + 1 for Ascend's scatter/attention ops. The last
position is a scratch row: writes of padding tokens (valid == False) land there, so a
ragged batch never clobbers real entries and shapes stay static.
"""

from __future__ import annotations

import torch

from .registry import dispatching


@dispatching("kv_write")
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
    """Write k, v [B, T, Hkv, D] at (slot_ids[b], positions[b, t]) where valid[b, t]."""
    scratch = k_cache.shape[1] - 1
    pos = torch.where(valid, positions, torch.full_like(positions, scratch))
    slots = slot_ids.unsqueeze(1).expand_as(pos)
    k_cache[slots, pos] = k.to(k_cache.dtype)
    v_cache[slots, pos] = v.to(v_cache.dtype)
