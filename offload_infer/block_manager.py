"""KV-cache blocks as plain bookkeeping (no tensors): which blocks of a pool are free, which a sequence holds.

A sequence reserves, when it is admitted, every block it can ever need (prompt + new tokens + the
largest tree it may write), so a running request never waits for memory and is never preempted;
the scheduler admits a request only when every pool can hold it.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one slot, got {n_blocks} x {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self._free = list(range(n_blocks - 1, -1, -1))  # popped from the end: low block ids first

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def fits_ever(self, slots: int) -> bool:
        """Whether a sequence of ``slots`` slots fits the pool when nothing else is in it."""
        return self.blocks_for(slots) <= self.n_blocks

    def can_allocate(self, slots: int) -> bool:
        return self.blocks_for(slots) <= len(self._free)

    def allocate(self, slots: int) -> list[int]:
        n = self.blocks_for(slots)
        assert n <= len(self._free), f"allocating {n} blocks with {len(self._free)} free"
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, blocks: list[int]) -> None:
        assert not set(blocks) & set(self._free), "a block freed twice"
        self._free.extend(reversed(blocks))
