"""One model's paged K/V over shared block tables, and what one forward needs to address it.

A sequence slot's length is where its next write starts (the engine reads it as the anchor
position); rolling back rejected drafts is lowering it. Data never moves and shapes never
change, so a step can be captured as a graph.
"""

from __future__ import annotations

import torch

from ops.context import ForwardContext

from .block_tables import BlockTables


class StepMeta:
    """One forward's cache addressing, shared by every layer: the flat rows its K/V go to, the
    block tables its attention reads through (as many columns as `ctx.num_keys` covers, so no
    forward reads a device value to size itself), and the forward's context for the ops."""

    def __init__(self, tables: BlockTables, slot_ids: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, ctx: ForwardContext) -> None:
        columns = tables.columns_for(ctx.num_keys)
        self.slot_mapping = tables.slot_mapping(slot_ids, positions, valid)
        self.block_table = tables.rows(slot_ids, columns)
        self.num_keys = columns * tables.block_size
        self.ctx = ctx


class PagedKVCache:
    """K and V of `num_layers` layers over shared block tables, with per-slot lengths."""

    def __init__(self, num_layers: int, tables: BlockTables, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        device = tables.device if device is None else torch.device(device)
        shape = (tables.physical_blocks, tables.block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(tables.num_seqs, dtype=torch.long, device=device)
        self.tables = tables

    @classmethod
    def contiguous(cls, num_layers: int, num_slots: int, capacity: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device | str, block_size: int = 16) -> PagedKVCache:
        """A cache whose every slot owns `capacity` positions (no allocator)."""
        tables = BlockTables.contiguous(num_slots, capacity, device, block_size)
        return cls(num_layers, tables, num_kv_heads, head_dim, dtype, device)

    @property
    def capacity(self) -> int:
        return self.tables.capacity

    def address(self, slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                ctx: ForwardContext | None = None) -> StepMeta:
        """The cache addressing of one forward writing `positions` of `slot_ids` (`valid` False:
        padding), attending over the key columns `ctx.num_keys` asks for."""
        return StepMeta(self.tables, slot_ids, positions, valid, ctx or ForwardContext())

    def reset(self, slot_ids: torch.Tensor) -> None:
        self.lengths[slot_ids] = 0

    def set_lengths(self, slot_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slot_ids] = lengths

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
