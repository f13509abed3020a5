"""Paged KV cache: fixed-size blocks, a block table per sequence slot, exact block accounting.

Memory, not compute, caps concurrency when every request reserves `max_model_len` of K/V.
Here the K/V of each layer are one tensor of fixed-size blocks `[physical_blocks,
block_size, Hkv, D]` (Ascend's ND paged layout, also what the reference gathers from); a
request owns only the blocks its tokens reach, listed in its row of the block table.

    BlockAllocator  which allocatable blocks are free (a stack; exact accounting, checked).
    BlockTables     the block table [num_seqs, max_blocks_per_seq] int32 on the device and
                    its host mirror, shared by the target's cache and the drafter's, plus
                    the cache-wide layout: `null_block` (never written, stays zero: table
                    entries past a request's blocks point there, so attention over masked
                    keys never reads NaN/inf) and a scratch region after it where padding
                    tokens write, each to its own slot (Ascend's scatter kernel does not
                    guarantee duplicate slots).
    PagedKVCache    one model's K/V tensors over a BlockTables, and the per-slot lengths.

A sequence slot's length is where its next write starts (the engine reads it as the anchor
position); rolling back rejected drafts is lowering it. Data never moves and shapes never
change, so a step can be captured as a graph. `view_blocks` is how many table columns a
forward attends over (a host int: the engine sets it from lengths it knows on the host, a
graph runner to its bucket's width), so no forward reads a device value to size itself.
"""

from __future__ import annotations

import math

import torch


class BlockAllocator:
    """Free list over blocks 0..num_blocks-1."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))      # pop() hands out low ids first
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks wanted, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._is_free[b] = False
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._is_free[b]:
                raise RuntimeError(f"KV cache: block {b} freed twice")
            self._is_free[b] = True
            self._free.append(b)

    def check(self, owned: list[list[int]]) -> None:
        """Exact accounting: every block is either free or owned by exactly one sequence."""
        seen = [b for blocks in owned for b in blocks]
        if len(seen) != len(set(seen)):
            raise AssertionError("KV cache: a block is owned twice")
        if set(seen) & set(self._free) or len(seen) + len(self._free) != self.num_blocks:
            raise AssertionError(f"KV cache: {len(seen)} owned + {len(self._free)} free != {self.num_blocks} blocks")


class BlockTables:
    """The block table of every sequence slot, and the physical layout of the caches over it."""

    def __init__(self, num_seqs: int, max_blocks_per_seq: int, num_blocks: int, block_size: int,
                 device: torch.device | str, scratch_tokens: int) -> None:
        self.num_seqs = num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.num_blocks = num_blocks                  # allocatable blocks 0..num_blocks-1
        self.block_size = block_size
        self.null_block = num_blocks
        self.scratch_base = (num_blocks + 1) * block_size
        self.scratch_tokens = max(scratch_tokens, 1)
        self.physical_blocks = num_blocks + 1 + math.ceil(self.scratch_tokens / block_size)
        self.device = torch.device(device)
        self.table = torch.full((num_seqs, max_blocks_per_seq), self.null_block, dtype=torch.int32, device=device)
        self.owned: list[list[int]] = [[] for _ in range(num_seqs)]
        self._pending: list[tuple[int, int, int]] = []        # (slot, column, block) not yet on the device
        self.view_blocks = max_blocks_per_seq

    @classmethod
    def contiguous(cls, num_seqs: int, capacity: int, device: torch.device | str, block_size: int = 16,
                   scratch_tokens: int | None = None) -> BlockTables:
        """Every slot owns `capacity` positions up front (standalone drafters, training batches)."""
        per_seq = math.ceil(capacity / block_size)
        tables = cls(num_seqs, per_seq, num_seqs * per_seq, block_size, device, scratch_tokens or block_size)
        for s in range(num_seqs):
            tables.extend(s, list(range(s * per_seq, (s + 1) * per_seq)))
        tables.flush()
        return tables

    @property
    def capacity(self) -> int:
        """Positions one sequence can reach."""
        return self.max_blocks_per_seq * self.block_size

    def blocks_for(self, num_positions: int) -> int:
        return math.ceil(num_positions / self.block_size)

    def extend(self, slot: int, blocks: list[int]) -> None:
        """Give `slot` more blocks (host mirror now; the device table at the next `flush`)."""
        start = len(self.owned[slot])
        if start + len(blocks) > self.max_blocks_per_seq:
            raise ValueError(f"slot {slot}: {start + len(blocks)} blocks exceed {self.max_blocks_per_seq} per sequence")
        self.owned[slot].extend(blocks)
        self._pending += [(slot, start + i, b) for i, b in enumerate(blocks)]

    def release(self, slot: int) -> list[int]:
        """Forget the slot's blocks (returned for the allocator); its row points at the null
        block again at the next `flush`."""
        blocks, self.owned[slot] = self.owned[slot], []
        self._pending += [(slot, i, self.null_block) for i in range(len(blocks))]
        return blocks

    def flush(self) -> None:
        """Copy the step's table changes to the device in one transfer (before any forward)."""
        if self._pending:
            latest = {(slot, col): block for slot, col, block in self._pending}     # last write wins
            self._pending = []
            (slots, cols), blocks = zip(*latest.keys()), list(latest.values())
            index = torch.tensor([slots, cols], dtype=torch.long).to(self.device)
            self.table[index[0], index[1]] = torch.tensor(blocks, dtype=torch.int32).to(self.device)

    def rows_of(self, slot: int) -> torch.Tensor:
        """Flat cache rows of positions 0.. of a slot's owned blocks (inspection and tests)."""
        blocks = torch.tensor(self.owned[slot], dtype=torch.long)
        return (blocks.unsqueeze(1) * self.block_size + torch.arange(self.block_size)).flatten().to(self.device)

    def set_view(self, num_positions: int | None) -> None:
        """Forwards attend over the table columns covering `num_positions` (None: all of them)."""
        self.view_blocks = (self.max_blocks_per_seq if num_positions is None
                            else min(self.blocks_for(max(num_positions, 1)), self.max_blocks_per_seq))

    @property
    def num_keys(self) -> int:
        return self.view_blocks * self.block_size

    def rows(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """[B, view_blocks] block tables of the given slots."""
        return self.table.index_select(0, slot_ids)[:, : self.view_blocks]

    def slot_mapping(self, slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 flat cache rows (block * block_size + offset) for writes at `positions`.

        Padding tokens (valid False) get distinct scratch rows (flat token index modulo the
        scratch size); a valid position past the slot's table raises on the CPU."""
        bs = self.block_size
        pos = torch.where(valid, positions, torch.zeros_like(positions))
        block = self.table.index_select(0, slot_ids).gather(1, pos // bs).long()
        flat = torch.arange(positions.numel(), device=positions.device).view_as(positions)
        scratch = self.scratch_base + flat % self.scratch_tokens
        return torch.where(valid, block * bs + pos % bs, scratch)


class StepMeta:
    """One forward's cache addressing, shared by every layer: the flat rows its K/V go to,
    and the block tables (and key count) its attention reads through."""

    def __init__(self, tables: BlockTables, slot_ids: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor) -> None:
        self.slot_mapping = tables.slot_mapping(slot_ids, positions, valid)
        self.block_table = tables.rows(slot_ids)
        self.num_keys = tables.num_keys


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

    def address(self, slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> StepMeta:
        return StepMeta(self.tables, slot_ids, positions, valid)

    def reset(self, slot_ids: torch.Tensor) -> None:
        self.lengths[slot_ids] = 0

    def set_lengths(self, slot_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        self.lengths[slot_ids] = lengths

    def positions(self, tensor: torch.Tensor, slot: int) -> torch.Tensor:
        """A copy of one layer's K or V of a slot as [positions, Hkv, D] (inspection and tests)."""
        return tensor.view(-1, *tensor.shape[2:]).index_select(0, self.tables.rows_of(slot))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
