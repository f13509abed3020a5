"""The block table of every sequence slot and the physical layout of the caches over it.

The table [num_seqs, max_blocks_per_seq] int32 lives on the device with a host mirror
(`owned`); changes made while planning a step reach the device in one transfer (`flush`).
Two regions sit past the allocatable blocks: `null_block` (never written, stays zero:
table entries past a request's blocks point there, so attention over masked keys never
reads NaN/inf) and a scratch region where padding tokens write, each to its own row
(Ascend's scatter kernel does not guarantee duplicate rows).
"""

from __future__ import annotations

import math

import torch


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

    def columns_for(self, num_keys: int | None) -> int:
        """Table columns a forward spanning `num_keys` key positions reads (None: all)."""
        if num_keys is None:
            return self.max_blocks_per_seq
        return min(self.blocks_for(max(num_keys, 1)), self.max_blocks_per_seq)

    def rows(self, slot_ids: torch.Tensor, columns: int) -> torch.Tensor:
        """[B, columns] block tables of the given slots."""
        return self.table.index_select(0, slot_ids)[:, :columns]

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
