"""The step scheduler: which sequences run in the next step, and how many tokens each.

Contract of :meth:`Scheduler.schedule` (pure bookkeeping, no tensors):

- Running sequences first, oldest first: one token each once their prompt is computed
  (a decode), else the next chunk of their prompt. Then waiting sequences, first come
  first served, while a slot (``max_num_seqs``) and budget are left.
- The tokens of one step never exceed ``max_batched_tokens`` (a long prompt is computed
  in chunks across steps, so it never stalls the decodes).
- A waiting sequence whose prompt + ``max_tokens`` exceeds ``max_seq_len``, or the whole
  pool (shrunk for another process), is not admitted: it waits (the limit may rise, the
  pool may grow back); nothing is ever cut.
- A new sequence is admitted only when the blocks for its whole prompt are free, plus a
  small reserve for the running sequences' next tokens.
- When a running sequence needs a block and none is free, the newest running sequence is
  preempted: its blocks are freed and it goes back to the front of the waiting queue, to
  be recomputed from its prompt and generated tokens later. Running out of blocks is
  normal operation, never an error.

:meth:`Scheduler.update` records what a step computed; the engine core decides which
sequences finished and hands them to :meth:`Scheduler.finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.worker.core.blocks import BlockPool, blocks_for
from services.worker.core.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class Limits:
    """Limits in force (from the control settings)."""

    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_batched_tokens, self.max_seq_len) < 1:
            raise ValueError(f"limits must be positive: {self}")


@dataclass
class Chunk:
    """Tokens ``start .. start + length`` of one sequence, computed in this step.

    ``samples``: the chunk reaches the sequence's end, so its last logits pick a token.
    """

    seq: Sequence
    start: int
    length: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.length == self.seq.num_tokens


@dataclass
class StepPlan:
    """One step's work: single-token chunks (decodes) and longer prompt chunks."""

    decodes: list[Chunk] = field(default_factory=list)
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def chunks(self) -> list[Chunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Waiting and running queues over one :class:`BlockPool`."""

    def __init__(self, pool: BlockPool, limits: Limits) -> None:
        self.pool = pool
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # since start

    # -- queues -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a sequence wherever it is and free its blocks (None when unknown)."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues for good and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def preempt_all(self) -> int:
        """Send every running sequence back to waiting (for a reconfiguration)."""
        count = 0
        while self.running:
            self._preempt(self.running[-1])
            count += 1
        return count

    def preempt(self, seq: Sequence) -> None:
        """Send one running sequence back to waiting (recomputed when admitted again)."""
        self._preempt(seq)

    def preempt_newest(self, count: int) -> int:
        """Preempt up to ``count`` of the newest running sequences (after an OOM)."""
        done = 0
        while self.running and done < count:
            self._preempt(self.running[-1])
            done += 1
        return done

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.limits.max_batched_tokens
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted for an older one
                continue
            chunk = self._chunk_of_running(seq, budget, plan)
            if chunk is not None:
                self._place(chunk, plan)
                budget -= chunk.length
        if not plan.preempted:
            budget = self._admit(budget, plan)
        return plan

    def update(self, plan: StepPlan) -> None:
        """Account the tokens a step computed (their keys and values are now cached)."""
        for chunk in plan.chunks:
            chunk.seq.num_computed += chunk.length

    # -- internals ----------------------------------------------------------------------

    def _chunk_of_running(self, seq: Sequence, budget: int, plan: StepPlan) -> Chunk | None:
        computed = seq.num_computed
        want = min(seq.num_tokens - computed, budget)
        if want == 1 and len(seq.block_table) * self.pool.block_size > computed:
            return Chunk(seq, computed, 1)  # a decode with room in its last block
        if want <= 0:
            return None
        while True:
            length = self._fit(seq, want)
            if length > 0:
                self.pool.grow_table(seq.block_table, seq.num_computed + length)
                return Chunk(seq, seq.num_computed, length)
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return None

    def _fit(self, seq: Sequence, want: int) -> int:
        """The most of ``want`` tokens the held and free blocks can take."""
        capacity = (len(seq.block_table) + self.pool.num_free) * self.pool.block_size
        return max(0, min(want, capacity - seq.num_computed))

    def _admit(self, budget: int, plan: StepPlan) -> int:
        reserve = self.reserve_blocks()
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.limits.max_num_seqs:
                break
            if seq.total_len > self.limits.max_seq_len:
                continue  # waits for the limit to rise (or for its admission time-out)
            if blocks_for(seq.total_len, self.pool.block_size) > self.pool.num_blocks:
                continue  # could never finish in this pool: waits for it to grow back
            need = blocks_for(seq.num_tokens, self.pool.block_size) - len(seq.block_table)
            if need + reserve > self.pool.num_free:
                break  # first come, first served: nobody overtakes for lack of blocks
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            length = min(seq.num_uncomputed, budget)
            self.pool.grow_table(seq.block_table, seq.num_computed + length)
            self._place(Chunk(seq, seq.num_computed, length), plan)
            budget -= length
        return budget

    def reserve_blocks(self) -> int:
        """Blocks kept free at admission so running sequences can grow a while."""
        return min(len(self.running), max(1, self.pool.num_blocks // 100))

    @staticmethod
    def _place(chunk: Chunk, plan: StepPlan) -> None:
        (plan.decodes if chunk.length == 1 else plan.prefills).append(chunk)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
