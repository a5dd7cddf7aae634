"""Paged KV-cache bookkeeping: which fixed-size blocks belong to which sequence.

Contract: the cache is ``num_blocks`` blocks of ``block_size`` token slots. :meth:`BlockManager.allocate`
grows a block table so it covers ``num_tokens`` slots and returns the new block ids, or ``None`` -
changing nothing - when too few blocks are free; the scheduler then decides whom to preempt.
:meth:`free` returns a table's blocks at once (finish, abort, preemption).
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    """A free list of KV-cache blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, table: list[int], num_tokens: int) -> list[int] | None:
        """Extend ``table`` in place to cover ``num_tokens`` slots; the new blocks, or None if full."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            return None
        new = [self._free.popleft() for _ in range(max(need, 0))]
        table.extend(new)
        return new

    def free(self, table: list[int]) -> None:
        """Give back every block of ``table`` and empty it."""
        self._free.extend(table)
        table.clear()
