"""Paged KV-cache bookkeeping (torch-free): fixed-size blocks handed to sequences on demand.

The runner owns the cache tensor; this class only decides which block ids a sequence uses. A
sequence's KV for token position p lives in block `block_table[p // block_size]` at offset
`p % block_size`.
"""
from __future__ import annotations

from collections import deque

from services.inference.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its KV can hold `num_tokens` positions."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover `num_tokens` positions; raises if blocks run out."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, free {len(self._free)}")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks (finish, cancel or preemption)."""
        self._free.extend(seq.block_table)
        seq.block_table = []
