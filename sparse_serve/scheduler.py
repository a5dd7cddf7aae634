"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Contract: :meth:`Scheduler.schedule` fills one step within ``max_num_batched_tokens`` and
``max_num_seqs``. Running sequences come first, oldest first - a decoding sequence gets one token, a
(re)prefilling one a chunk of what the budget leaves. When the cache manager has no blocks for a
running sequence the newest running sequence is preempted (blocks freed, put back at the front of the
queue, recomputed later). Waiting sequences join in arrival order only if nothing was preempted in
this step. The scheduler never runs the model; it returns a :class:`SchedulerOutput`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sparse_serve.block_manager import BlockManager
from sparse_serve.config import SchedulerConfig
from sparse_serve.sequence import Sequence, Status


@dataclass
class Chunk:
    """``num_tokens`` tokens of ``seq`` starting at position ``start`` run in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """The chunk reaches the last known token, so this step samples the sequence's next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's work."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Waiting queue, running list and the per-step batch (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            if not self._reserve(seq, n, out):
                break  # seq itself was preempted: everyone after it is gone too
            out.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        return budget

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for ``n`` more tokens of a running ``seq``, preempting the newest until they fit."""
        while self.blocks.allocate(seq.block_table, seq.num_computed + n) is None:
            victim = self.running.pop()
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if self.blocks.allocate(seq.block_table, n) is None:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(Chunk(seq, 0, n))
            budget -= n

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first for recomputation."""
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` from the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
