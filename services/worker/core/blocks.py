"""The KV block pool: a free list of fixed-size blocks, handed to sequences and taken back.

Pure bookkeeping (no tensors): block ``b`` holds cache slots ``b * block_size ..
(b + 1) * block_size - 1`` of the runner's KV tensors. A sequence of ``n`` tokens holds
``ceil(n / block_size)`` blocks, so memory follows the tokens actually held.
"""

from __future__ import annotations

from collections import deque


class BlockPoolError(Exception):
    """A block was freed twice, or a block that the pool never handed out was freed."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens; lowest ids handed out first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @classmethod
    def holding(cls, num_blocks: int, block_size: int, used: set[int]) -> BlockPool:
        """A pool of ``num_blocks`` blocks of which ``used`` are handed out already."""
        if any(not 0 <= b < num_blocks for b in used):
            raise BlockPoolError(f"blocks in use beyond a pool of {num_blocks}")
        pool = cls(num_blocks, block_size)
        pool._free = deque(b for b in range(num_blocks) if b not in used)
        pool._used = set(used)
        return pool

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return self.num_used / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free blocks (raises ``BlockPoolError`` when fewer are free)."""
        if n > len(self._free):
            raise BlockPoolError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise BlockPoolError(f"block {block} freed but not in use")
            self._used.remove(block)
            self._free.append(block)

    def grow_table(self, table: list[int], num_tokens: int) -> bool:
        """Extend ``table`` to hold ``num_tokens`` tokens; False (unchanged) when short."""
        missing = blocks_for(num_tokens, self.block_size) - len(table)
        if missing <= 0:
            return True
        if not self.can_allocate(missing):
            return False
        table.extend(self.allocate(missing))
        return True


def compaction(tables: list[list[int]], num_blocks: int) -> dict[int, int] | None:
    """Moves that bring every block of ``tables`` below ``num_blocks`` (a smaller pool):
    ``{old id: new id}`` for the blocks at or above it, each to a free id below it; the
    others stay. None when the tables hold more than ``num_blocks`` blocks."""
    used = {b for table in tables for b in table}
    if len(used) > num_blocks:
        return None
    free = iter(sorted(set(range(num_blocks)) - used))
    return {b: next(free) for b in sorted(used) if b >= num_blocks}
