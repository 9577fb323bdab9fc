"""Which requests run in the next step, and how many tokens each brings (plain Python, no tensors).

Requests are admitted first come, first served while there is room in the batch and every KV pool
can hold them (a request reserves all it can ever need when admitted, so a running request never
waits for memory). A step's tokens (``max_batch_tokens``) go first to the running requests' trees,
then to prompt prefill in chunks; while a prompt is waiting to be read, trees get at most half the
step, so a long prompt neither stalls the others nor waits behind them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from offload_infer.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    decode: list[Sequence]  # requests that verify a tree (or a lone root) this step
    tree_tokens: int  # the most tokens each of their trees may hold, root included
    prefill: list[tuple[Sequence, int]]  # requests that read the next n tokens of their prompt


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < max_batch_size:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be at least max_batch_size "
                             f"({max_batch_size}): every running request brings a token to each step")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq_id: int) -> Sequence | None:
        """Take a request out of the queue or the batch (the caller frees its KV)."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.id == seq_id:
                self.running.remove(seq)
                return seq
        return None

    def admit(self, allocate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Move waiting requests into the batch, in arrival order, while ``allocate`` finds them room."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size and allocate(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self, tree_tokens: int) -> ScheduledStep:
        """The next step's work; ``tree_tokens`` is the largest tree a request would like (root included)."""
        decode = [s for s in self.running if s.decoding]
        prefill = [s for s in self.running if not s.decoding]
        cap = self.max_batch_tokens
        room_for_trees = max(len(decode), cap // 2) if prefill else cap
        per_tree = max(1, min(tree_tokens, room_for_trees // max(1, len(decode))))
        room = cap - per_tree * len(decode)
        chunks = []
        for s in prefill:
            n = min(s.remaining_prompt, room)
            if n <= 0:
                break
            chunks.append((s, n))
            room -= n
        return ScheduledStep(decode, per_tree, chunks)

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
