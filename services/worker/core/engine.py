"""The engine core: ``add`` requests, ``step()`` = schedule -> execute -> update, ``apply``
settings between steps, ``abort``, ``stats``. No Redis, no HTTP: the worker service and
the benchmark runner drive it through :class:`services.worker.loop.ServingLoop`.

Contract:

- Every request added is finished exactly once, in some ``StepOutput.finished``: ``stop``
  / ``length`` when generated, ``error`` (with a message) when it can't be served,
  ``cancelled`` after :meth:`EngineCore.abort`. Nothing is lost to a preemption, an OOM or
  a reconfiguration: those sequences are recomputed from their prompt and generated tokens.
- A request's content is never altered: one that can never fit (prompt + ``max_tokens``
  over the model's context, or over the whole KV pool) is rejected with an error that says
  why; one that only exceeds the current ``max_seq_len`` setting waits for it to rise, up
  to ``admission_timeout_s``, then gets an error.
- A CUDA out-of-memory in a step is caught: memory is freed, the newest half of the
  running sequences is preempted, the step's token budget is halved for a while, and the
  step is retried at the next call. A sequence that runs out of memory alone fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace

import torch

from services.worker.core.blocks import BlockPool, blocks_for, compaction
from services.worker.core.llama import LlamaWeights, unsupported_reason
from services.worker.core.runner import MemoryPlan, ModelRunner, RunnerConfig
from services.worker.core.sampling import SamplingBatch
from services.worker.core.scheduler import Chunk, Limits, Scheduler, StepPlan
from services.worker.core.sequence import Sequence
from services.worker.model import LoadedModel
from services.worker.oom import OomInfo, OomInjector, is_oom
from services.worker.precision import PrecisionChange, apply_precision, free_memory
from services.worker.rows import (
    RequestOutcome,
    Row,
    RowPlan,
    cap_seq_len,
    context_problem,
    validate_prompt,
)
from shared.schemas import ControlSettings, GenerationRequest, Precision, TokenDelta, now

log = logging.getLogger(__name__)

OOM_RELAX_STEPS = 64  # steps without an OOM before a halved budget doubles again


class EngineUnsupported(Exception):
    """The loaded model's architecture is not one the engine core runs."""


@dataclass(frozen=True)
class CoreConfig:
    """Start-up configuration; the limits change later through :meth:`EngineCore.apply`."""

    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    max_seq_len: int = 0  # 0: the model's context length
    kv_budget_bytes: int = 0  # 0: all the memory the device can spare
    cuda_graphs: bool = True
    paged_kernel: bool = True  # Triton decode attention on CUDA (else gather + SDPA)
    admission_timeout_s: float = 120.0
    ignore_eos: bool = False  # every request runs to max_tokens (benchmarks)
    # Decode steps run back to back on the device when every running sequence decodes
    # and nobody waits: host work (scheduling, bookkeeping) is paid once per this many.
    decode_steps: int = 4
    gpu_memory_fraction: float = 0.0


@dataclass
class StepStats:
    """What one step did (summed into windows by the worker and the benchmark)."""

    ts: float
    seconds: float
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sampled: int = 0
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0
    finished: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    oom: OomInfo | None = None
    # The running set's shape after the step: what the batch engine's "batch" was.
    max_prompt_len: int = 0
    mean_prompt_len: float = 0.0
    max_new_tokens: int = 0


@dataclass
class StepOutput:
    finished: list[RequestOutcome]
    deltas: list[TokenDelta]
    stats: StepStats


@dataclass(frozen=True)
class CoreStats:
    """A snapshot of the core between steps."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    kv_bytes: int
    preemptions: int
    limits: Limits
    precision: Precision
    memory: MemoryPlan | None

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class ResizeReport:
    """What a live resize of the KV pool did."""

    blocks_before: int
    blocks_after: int
    blocks_moved: int
    preempted: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.blocks_before} -> {self.blocks_after} blocks, {self.blocks_moved} "
                f"moved, {self.preempted} preempted, {1000 * self.seconds:.0f} ms")  # fmt: skip


class EngineCore:
    """Continuous batching over one loaded model on one device."""

    def __init__(
        self, loaded: LoadedModel, config: CoreConfig, fault: OomInjector | None = None
    ) -> None:
        reason = unsupported_reason(loaded.model.config)
        if reason:
            raise EngineUnsupported(reason)
        self.loaded = loaded
        self.config = config
        self.fault = fault
        self.device = torch.device(loaded.device)
        self.eos = frozenset() if config.ignore_eos else frozenset(loaded.eos_token_ids)
        self.runner = self._new_runner(config.kv_budget_bytes)
        self.kv_budget_bytes = config.kv_budget_bytes
        self.limits = Limits(
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            max_seq_len=cap_seq_len(config.max_seq_len, self.loaded.context_length),
        )
        self.scheduler = Scheduler(self._new_pool(), self.limits)
        self._pending: list[RequestOutcome] = []  # rejected or cancelled, out next step
        self._oom_cap: int | None = None
        self._steps_since_oom = 0
        self.steps = 0
        self._precision_saved: int | None = None  # by the last precision change, read once
        self.resizes: list[ResizeReport] = []  # every live pool resize, oldest first

    # -- requests -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        """Queue a request; one that can never be served is answered at the next step."""
        row = Row(request, self.loaded.tokenizer.backend_tokenizer, now())
        row.plan = RowPlan(list(request.prompt_token_ids), request.params.max_tokens)
        problem = self._reject_reason(request)
        if problem:
            row.fail(problem, now())
            self._pending.append(row.outcome())
            return
        seq = Sequence(row, row.plan.prompt_ids, request.params.max_tokens)
        seq.added_at = time.monotonic()
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request (client gone, deadline passed); its blocks are freed now."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        seq.row.finish_reason = "cancelled"
        seq.row.finished_at = now()
        self._pending.append(seq.row.outcome())
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.num_unfinished or self._pending)

    def free_slots(self) -> int:
        """How many more requests to take in: enough to fill the running set and a step."""
        want = 2 * self.limits.max_num_seqs
        return max(0, want - self.scheduler.num_unfinished)

    def _capacity(self) -> int:
        """Blocks the pool may grow to (its size now where the runner cannot tell)."""
        memory = self.runner.memory
        capacity = memory.capacity_blocks if memory is not None else 0
        return max(self.scheduler.pool.num_blocks, capacity)

    def _reject_reason(self, request: GenerationRequest) -> str | None:
        problem = validate_prompt(
            request.prompt_token_ids, self.runner.shape.vocab
        ) or context_problem(request, self.loaded.context_length)
        if problem:
            return problem
        total = request.prompt_len + request.params.max_tokens
        # Against the largest pool this worker's share of the card could hold: a pool
        # sized small, or shrunk, for other processes may grow, so a request that only
        # exceeds the current one waits (see _expire_waiting).
        largest = self._capacity()
        if blocks_for(total, self.runner.block_size) > largest:
            tokens = largest * self.runner.block_size
            return f"request of {total} tokens is larger than the whole KV pool ({tokens})"
        return None

    # -- one step -------------------------------------------------------------------------

    def step(self) -> StepOutput:
        started = time.perf_counter()
        finished = self._pending + self._expire_waiting()
        self._pending = []
        stats = StepStats(ts=now(), seconds=0.0)
        preempted_before = self.scheduler.preemptions
        plan = self.scheduler.schedule()
        deltas: list[TokenDelta] = []
        if not plan.empty:
            steps = self._steps_ahead(plan)
            try:
                if steps > 1:
                    tokens = self._execute_steps(plan, steps)
                else:
                    sampled = self._execute(plan)
            except Exception as exc:
                if is_oom(exc):
                    stats.oom = self._recover_from_oom(plan, str(exc)[:300], finished)
                else:
                    self._isolate_failure(plan, exc, stats, finished, deltas)
            else:
                if steps > 1:
                    self._account_steps(plan, tokens, stats, finished, deltas)
                else:
                    self._account(plan, sampled, stats, finished, deltas)
        stats.seconds = time.perf_counter() - started
        stats.finished = len(finished)
        stats.preemptions = self.scheduler.preemptions - preempted_before
        self._fill_gauges(stats)
        self.steps += 1
        return StepOutput(finished, deltas, stats)

    def _execute(self, plan: StepPlan) -> list[int]:
        if self.fault is not None:
            self.fault.maybe_raise(len(plan.chunks), plan.num_tokens, step=0)
        return self.runner.execute(plan, self._sampling)

    def _steps_ahead(self, plan: StepPlan) -> int:
        """How many decode steps to run at once: 1 unless every running sequence decodes,
        nobody who waits could join (none waits, or every slot is taken: a slot freed
        part-way is taken a few steps later), and the blocks for the tokens ahead can be
        had."""
        steps = self.config.decode_steps
        full = len(self.scheduler.running) >= self.limits.max_num_seqs
        if steps <= 1 or plan.prefills or plan.preempted or (self.scheduler.waiting and not full):
            return 1
        if not all(c.samples for c in plan.decodes):
            return 1
        room = min(self.runner.shape.max_positions - c.start for c in plan.decodes)
        steps = min(steps, room)
        pool = self.scheduler.pool
        for chunk in plan.decodes:
            if not pool.grow_table(chunk.seq.block_table, chunk.start + steps):
                return 1  # the blocks taken so far serve the next tokens anyway
        return steps

    def _execute_steps(self, plan: StepPlan, steps: int) -> list[list[int]]:
        if self.fault is not None:
            self.fault.maybe_raise(len(plan.chunks), plan.num_tokens, step=0)
        return self.runner.decode_steps(plan.decodes, steps, self._sampling(plan.decodes))

    def _account_steps(
        self,
        plan: StepPlan,
        tokens: list[list[int]],
        stats: StepStats,
        finished: list[RequestOutcome],
        deltas: list[TokenDelta],
    ) -> None:
        """Take the tokens of several decode steps; a sequence that finished part-way
        drops the rest (computed for nothing, never shown)."""
        seqs = [c.seq for c in plan.decodes]
        began, ended = stats.ts, now()
        for i, step_tokens in enumerate(tokens):
            stamp = began + (ended - began) * (i + 1) / len(tokens)
            for seq, token in zip(seqs, step_tokens, strict=True):
                if not seq.finished:
                    seq.num_computed += 1
                    self._take_token(seq, token, stamp, stats)
                    stats.sampled += 1
        for seq in seqs:
            if seq.finished:
                self.scheduler.finish(seq)
                finished.append(seq.row.outcome())
            elif seq.row.streams and (delta := seq.row.take_delta()) is not None:
                deltas.append(delta)
        stats.decode_tokens = stats.sampled
        self._relax_oom_cap()

    def _sampling(self, chunks: list[Chunk]) -> SamplingBatch:
        params = [c.seq.row.request.params for c in chunks]
        generated = [len(c.seq.generated) for c in chunks]
        return SamplingBatch.build(params, generated, self.device)

    def _account(
        self,
        plan: StepPlan,
        sampled: list[int],
        stats: StepStats,
        finished: list[RequestOutcome],
        deltas: list[TokenDelta],
    ) -> None:
        self.scheduler.update(plan)
        stamp = now()
        chunks = [c for c in plan.chunks if c.samples]
        for chunk, token in zip(chunks, sampled, strict=True):
            self._take_token(chunk.seq, token, stamp, stats)
            if chunk.seq.finished:
                self.scheduler.finish(chunk.seq)
                finished.append(chunk.seq.row.outcome())
            elif chunk.seq.row.streams:
                delta = chunk.seq.row.take_delta()
                if delta is not None:
                    deltas.append(delta)
        stats.decode_tokens += sum(c.length for c in plan.decodes)
        stats.prefill_tokens += sum(c.length for c in plan.prefills)
        stats.sampled += len(sampled)
        self._relax_oom_cap()

    def _take_token(self, seq: Sequence, token: int, stamp: float, stats: StepStats) -> None:
        first = seq.row.first_token_at is None
        if not seq.row.request.params.ignore_eos or token not in self.eos:
            seq.row.add(token, self.eos, stamp)
        else:  # ignore_eos: EOS is a token like any other
            seq.row.add(token, frozenset(), stamp)
        if first:
            stats.ttft_s.append(stamp - seq.row.request.enqueued_at)
        elif seq.last_token_at is not None:
            stats.itl_s.append(stamp - seq.last_token_at)
        seq.last_token_at = stamp

    def _expire_waiting(self) -> list[RequestOutcome]:
        """Fail requests that waited too long for limits that fit them: a max_seq_len
        that rose, or a KV pool that grew back after a shrink."""
        deadline = time.monotonic() - self.config.admission_timeout_s
        outcomes = []
        for seq in list(self.scheduler.waiting):
            why = self._unfit(seq)
            if why is None or seq.added_at >= deadline:
                continue
            self.scheduler.finish(seq)
            waited = f"; waited {self.config.admission_timeout_s:.0f} s for that to change"
            seq.row.fail(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens "
                         f"({seq.max_tokens}) exceeds {why}{waited}", now())  # fmt: skip
            outcomes.append(seq.row.outcome())
        return outcomes

    def _unfit(self, seq: Sequence) -> str | None:
        if seq.total_len > self.limits.max_seq_len:
            return f"the worker's current max_seq_len {self.limits.max_seq_len}"
        pool = self.scheduler.pool
        if blocks_for(seq.total_len, pool.block_size) > pool.num_blocks:
            return f"the KV pool, now {pool.num_blocks * pool.block_size} tokens"
        return None

    def _fill_gauges(self, stats: StepStats) -> None:
        running = self.scheduler.running
        if running:
            prompts = [len(s.prompt_ids) for s in running]
            stats.max_prompt_len = max(prompts)
            stats.mean_prompt_len = sum(prompts) / len(prompts)
            stats.max_new_tokens = max(s.max_tokens for s in running)
        stats.running = len(self.scheduler.running)
        stats.waiting = len(self.scheduler.waiting)
        stats.kv_blocks_used = self.scheduler.pool.num_used
        stats.kv_blocks_total = self.scheduler.pool.num_blocks

    # -- failures -------------------------------------------------------------------------

    def _isolate_failure(
        self,
        plan: StepPlan,
        exc: Exception,
        stats: StepStats,
        finished: list[RequestOutcome],
        deltas: list[TokenDelta],
    ) -> None:
        """A step failed (not for memory): run each sequence's part alone, so the one
        that fails gets an error and every other goes on; the process stays up."""
        log.exception("a step of %d sequences failed; running each alone", len(plan.chunks))
        for chunk in plan.chunks:
            alone = StepPlan()
            alone.decodes.append(chunk) if chunk.length == 1 else alone.prefills.append(chunk)
            try:
                sampled = self._execute(alone)
            except Exception as single:
                if is_oom(single):
                    raise
                self.scheduler.finish(chunk.seq)
                chunk.seq.row.fail(f"the engine failed on this request: {single!r}"[:500], now())
                finished.append(chunk.seq.row.outcome())
                log.error("request %s failed alone: %r (step error was %r)",
                          chunk.seq.request_id, single, exc)  # fmt: skip
                continue
            self._account(alone, sampled, stats, finished, deltas)

    # -- out of memory --------------------------------------------------------------------

    def _recover_from_oom(
        self, plan: StepPlan, message: str, finished: list[RequestOutcome]
    ) -> OomInfo:
        free_memory()
        running = self.scheduler.running
        lone = len(running) <= 1 and plan.num_tokens <= self.runner.block_size
        shape = {
            "batch_size": len(plan.chunks),
            "max_prompt_len": max(len(c.seq.prompt_ids) for c in plan.chunks),
            "max_new_tokens": max(c.seq.max_tokens for c in plan.chunks),
        }
        if lone:
            for chunk in plan.chunks:
                self.scheduler.finish(chunk.seq)
                chunk.seq.row.fail(f"out of memory even alone: {message}", now())
                finished.append(chunk.seq.row.outcome())
            return OomInfo(
                **shape, recovered=False, action="failed the request alone", message=message
            )
        self._oom_cap = max(self.runner.block_size, plan.num_tokens // 2)
        self._steps_since_oom = 0
        preempted = self.scheduler.preempt_newest(len(running) // 2)
        self.scheduler.limits = self._effective_limits()
        action = f"preempted {preempted} of {len(running) + preempted}, step budget {self._oom_cap}"
        log.warning("CUDA out of memory in a step of %d tokens: %s", plan.num_tokens, action)
        return OomInfo(**shape, recovered=True, action=action, message=message)

    def _relax_oom_cap(self) -> None:
        if self._oom_cap is None:
            return
        self._steps_since_oom += 1
        if self._steps_since_oom >= OOM_RELAX_STEPS:
            self._steps_since_oom = 0
            doubled = 2 * self._oom_cap
            self._oom_cap = None if doubled >= self.limits.max_batched_tokens else doubled
            self.scheduler.limits = self._effective_limits()

    def _effective_limits(self) -> Limits:
        if self._oom_cap is None:
            return self.limits
        return replace(
            self.limits, max_batched_tokens=min(self._oom_cap, self.limits.max_batched_tokens)
        )

    # -- settings -------------------------------------------------------------------------

    def apply(self, settings: ControlSettings) -> list[str]:
        """Apply the agent's settings between steps; what changed, for the log."""
        changes = self._apply_precision(settings.precision)
        if settings.kv_budget_bytes != self.kv_budget_bytes:
            changes.append(self._change_budget(settings.kv_budget_bytes))
        limits = Limits(
            max_num_seqs=settings.batch_size,
            max_batched_tokens=settings.max_batched_tokens or self.config.max_batched_tokens,
            max_seq_len=cap_seq_len(settings.max_seq_len, self.loaded.context_length),
        )
        if limits != self.limits:
            changes.append(f"limits {limits}")
            self.limits = limits
            self.scheduler.limits = self._effective_limits()
        return changes

    def _apply_precision(self, precision: Precision) -> list[str]:
        if precision == self.loaded.precision:
            return []
        preempted = self.scheduler.preempt_all()
        self.runner.release_cache()
        change: PrecisionChange = apply_precision(self.loaded, precision)  # may raise
        self.runner = self._new_runner(self.kv_budget_bytes)
        self.scheduler.pool = self._new_pool()
        self._precision_saved = change.bytes_saved
        return [f"precision {change.before} -> {change.after} ({preempted} preempted, "
                f"{change.describe()})"]  # fmt: skip

    def _change_budget(self, budget: int) -> str:
        if budget == 0:  # "what the device can spare": profile again from scratch
            self.scheduler.preempt_all()
            self.runner.allocate(0)
            self.scheduler.pool = self._new_pool()
            self.kv_budget_bytes = 0
            return "KV budget auto (re-profiled)"
        report = self.resize_kv(budget)
        return f"KV budget {budget} B: {report}"

    def resize_kv(self, budget_bytes: int) -> ResizeReport:
        """Make the KV pool ``budget_bytes`` big, live: the running sequences keep their
        cache (blocks above the new size move down); only when they hold more than the new
        pool do the newest get preempted. Memory goes back to the driver layer by layer."""
        started = time.perf_counter()
        room = self.runner.room_for_kv_bytes()
        if room is not None:
            budget_bytes = min(budget_bytes, room)
        block_bytes = self.runner.block_size * self.runner.kv_bytes_per_token
        blocks = max(1, budget_bytes // block_bytes)
        old = self.scheduler.pool.num_blocks
        preempted = 0
        for seq in list(self.scheduler.running):  # could never finish in the new pool
            if blocks_for(seq.total_len, self.runner.block_size) > blocks:
                self.scheduler.preempt(seq)
                preempted += 1
        while self.scheduler.pool.num_used > blocks - self.scheduler.reserve_blocks():
            if not self.scheduler.running:
                break
            preempted += self.scheduler.preempt_newest(1)
        tables = [s.block_table for s in self.scheduler.running]
        moves = compaction(tables, blocks) or {}
        for table in tables:
            table[:] = [moves.get(b, b) for b in table]
        used = {b for table in tables for b in table}
        kept = sorted(used - set(moves.values()))
        self.scheduler.pool = BlockPool.holding(blocks, self.runner.block_size, used)
        if not self._resize_runner(blocks, moves, kept):
            # Another process took the memory a layer needed: every running sequence is
            # recomputed later, and a pool that fits now replaces this one. (Outside the
            # except block: its traceback would keep the old layers alive.)
            preempted += self.scheduler.preempt_all()
            blocks, used = self.runner.remake(budget_bytes), set()
            budget_bytes = blocks * block_bytes  # what it is: a later budget grows it again
            log.warning("KV pool resize ran out of memory: pool re-made at %d blocks, "
                        "%d sequences preempted", blocks, preempted)  # fmt: skip
        self.scheduler.pool = BlockPool.holding(blocks, self.runner.block_size, used)
        self.kv_budget_bytes = budget_bytes
        report = ResizeReport(old, blocks, len(moves), preempted, time.perf_counter() - started)
        self.resizes.append(report)
        return report

    def _resize_runner(self, blocks: int, moves: dict[int, int], kept: list[int]) -> bool:
        try:
            self.runner.resize(blocks, moves, kept)
        except torch.OutOfMemoryError:
            return False
        return True

    def _new_runner(self, budget: int) -> ModelRunner:
        cfg = self.config
        runner_config = RunnerConfig(
            block_size=cfg.block_size,
            kv_budget_bytes=budget,
            max_batched_tokens=cfg.max_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            cuda_graphs=cfg.cuda_graphs,
            paged_kernel=cfg.paged_kernel,
            gpu_memory_fraction=cfg.gpu_memory_fraction,
        )
        runner = ModelRunner(LlamaWeights.from_model(self.loaded.model), self.device, runner_config)
        runner.allocate()
        return runner

    def _new_pool(self) -> BlockPool:
        return BlockPool(self.runner.num_blocks, self.runner.block_size)

    def warm_up(self) -> int:
        """Capture the decode graphs up to the largest batch the runner takes (any limit
        the agent may set later) now; how many were captured."""
        rows = max(self.limits.max_num_seqs, self.runner.config.max_graph_batch)
        return self.runner.capture_all(rows, self.loaded.context_length)

    # -- statistics -----------------------------------------------------------------------

    @property
    def precision(self) -> Precision:
        return self.loaded.precision

    def stats(self) -> CoreStats:
        pool = self.scheduler.pool
        return CoreStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=pool.num_used,
            kv_blocks_total=pool.num_blocks,
            block_size=pool.block_size,
            kv_bytes=pool.num_blocks * pool.block_size * self.runner.kv_bytes_per_token,
            preemptions=self.scheduler.preemptions,
            limits=self.limits,
            precision=self.loaded.precision,
            memory=self.runner.memory,
        )

    def take_precision_saved(self) -> int | None:
        """Bytes the last precision change freed (negative: took); None once read."""
        saved, self._precision_saved = self._precision_saved, None
        return saved

    def take_unstarted(self) -> list[str]:
        """Remove the waiting requests that never ran (to hand them to another worker)."""
        unstarted = [s for s in self.scheduler.waiting if not s.generated and not s.preemptions]
        for seq in unstarted:
            self.scheduler.finish(seq)
        return [s.request_id for s in unstarted]

    def unfinished_ids(self) -> Seq[str]:
        return [s.request_id for s in [*self.scheduler.running, *self.scheduler.waiting]]
