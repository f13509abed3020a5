"""Which KV blocks are free: a free list with exact accounting (a block is free or owned by
exactly one sequence, never both, never twice)."""

from __future__ import annotations


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


