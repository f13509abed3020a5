"""Static slot KV cache.

Each request owns a slot; each slot has room for `capacity` positions (plus one scratch
row for padding writes). `lengths[slot]` is the number of valid (committed) positions, and
it is what the next step reads: the engine starts a slot's next write at its length, and
the causal masks built from those positions let attention see positions < length plus
the step's own tokens, never the stale tail. Rolling back rejected speculative tokens is
lowering a length: data never moves, shapes never change, so a step can be captured as a
graph.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, capacity: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots, capacity + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.capacity = capacity
        self.num_slots = num_slots

    def reset(self, slot_ids: torch.Tensor) -> None:
        self.lengths[slot_ids] = 0

    def set_lengths(self, slot_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slot_ids] = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
