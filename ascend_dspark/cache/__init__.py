"""Paged KV cache: fixed-size blocks, a block table per sequence slot, exact block accounting.

Memory, not compute, caps concurrency when every request reserves `max_model_len` of K/V.
Here the K/V of each layer are one tensor of fixed-size blocks `[physical_blocks,
block_size, Hkv, D]` (Ascend's ND paged layout, also what the reference gathers from); a
request owns only the blocks its tokens reach, listed in its row of the block table.

    BlockAllocator  which allocatable blocks are free (allocator.py).
    BlockTables     the block tables of every sequence slot and the cache-wide layout
                    (block_tables.py), shared by the target's cache and the drafter's.
    PagedKVCache    one model's K/V tensors over a BlockTables, and the per-slot lengths;
                    `address()` gives one forward's `StepMeta` (paged.py).

The package sits beneath the models and drafters, which read and write the cache through a
forward's StepMeta; the engine decides who gets which blocks (engine/scheduler.py) and the
model runner owns the device tensors (engine/runner.py).
"""

from .allocator import BlockAllocator
from .block_tables import BlockTables
from .paged import PagedKVCache, StepMeta

__all__ = ["BlockAllocator", "BlockTables", "PagedKVCache", "StepMeta"]
