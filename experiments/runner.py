"""AEGIS in-process: the worker's batch loop over a request list, static or closed-loop.

:class:`AegisRunner` does what ``services.worker.service.Worker`` does per cycle, minus
Redis: keep a look-ahead buffer of ``lookahead x batch`` requests (FIFO), pick the batch
with :func:`select_batch`, run it through the engine under :func:`run_with_oom_guard`,
and record the cycle. With a :class:`ClosedLoop` the agent's policy sees every cycle
(CycleStats, OOM events, the GPU's memory as the driver reports it) and its decisions
are applied at the next batch boundary, as the real worker applies the control hash.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from experiments.context import Bar
from experiments.measure import RunResult, sync
from services.agent.memory_model import Coefficients, MemoryModel
from services.agent.policy import (
    AgentPolicy,
    Observation,
    PolicyConfig,
    PolicyDecision,
    WorkerControlState,
    cycle_memory_view,
)
from services.worker.engine import BatchLimits, BatchOutcome, HFGenerateEngine, combine_outcomes
from services.worker.oom import OomInfo, run_with_oom_guard
from services.worker.scheduler import select_batch
from services.worker.stats import CycleContext, cycle_stats
from shared.schemas import ControlSettings, CycleStats, GenerationRequest, OomEvent

WORKER_ID = "bench"
OnCycle = Callable[[int, float], None]  # (requests answered so far, seconds since start)


@dataclass
class CycleRecord:
    """One batch of a run, for timelines and plots (seconds since the run started)."""

    t_end: float
    seconds: float
    batch_size: int
    batch_setting: int
    tokens: int
    failed: int
    oom_events: int
    recoveries: int
    max_prompt_len: int
    peak_memory_bytes: int | None
    precision: str
    max_seq_len: int


@dataclass
class ClosedLoop:
    """The agent's policy in the loop: one observation per cycle, decisions applied."""

    policy: AgentPolicy
    state: WorkerControlState
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls, settings: ControlSettings, config: PolicyConfig, prior: Coefficients
    ) -> ClosedLoop:
        state = WorkerControlState(WORKER_ID, settings, model=MemoryModel(prior=prior))
        return cls(AgentPolicy(config), state)

    def observe(
        self, cycle: CycleStats, ooms: Sequence[OomEvent], t_rel: float
    ) -> ControlSettings | None:
        """Feed one cycle; the new settings when the policy changed them."""
        memory = cycle_memory_view(cycle, self.policy.config.overhead_bytes)
        obs = Observation(ts=time.time(), memory=memory, cycles=[cycle], ooms=list(ooms))
        decision = self.policy.decide(self.state, obs)
        if decision is None:
            return None
        self.decisions.append(_decision_record(decision, t_rel))
        return decision.after


def _decision_record(decision: PolicyDecision, t_rel: float) -> dict[str, Any]:
    return {
        "t": round(t_rel, 3),
        "action": decision.action.value,
        "summary": decision.summary(),
        "batch_size": decision.after.batch_size,
        "max_seq_len": decision.after.max_seq_len,
        "precision": decision.after.precision,
    }


@dataclass
class _Batch:
    requests: list[GenerationRequest]
    outcome: BatchOutcome
    ooms: list[OomInfo]
    seconds: float


class AegisRunner:
    """Runs request lists through AEGIS's engine as the worker loop would."""

    def __init__(self, engine: HFGenerateEngine, device: str, lookahead: float = 2.0) -> None:
        self.engine = engine
        self.device = device
        self.lookahead = lookahead

    def run(
        self,
        requests: Sequence[GenerationRequest],
        settings: ControlSettings,
        system: str = "aegis",
        loop: ClosedLoop | None = None,
        on_cycle: OnCycle | None = None,
        bar: Bar | None = None,
    ) -> tuple[RunResult, list[CycleRecord]]:
        """Answer every request; the result counts lost (unanswered) ones as failed."""
        waiting = deque(requests)
        buffer: list[GenerationRequest] = []
        answered: dict[str, bool] = {}  # id -> succeeded
        result = RunResult(system, len(requests), batch_size=settings.batch_size)
        cycles: list[CycleRecord] = []
        self._apply(settings)
        sync(self.device)
        start = time.perf_counter()
        while waiting or buffer:
            chosen, buffer = self._next_batch(waiting, buffer, settings)
            ran = self._run_batch(chosen, settings)
            t_rel = time.perf_counter() - start
            cycles.append(self._record(ran, settings, t_rel, answered, result))
            if bar is not None:
                bar.update(len(chosen))
            if loop is not None:
                settings = self._feedback(loop, ran, settings, len(waiting) + len(buffer), t_rel)
            if on_cycle is not None:
                on_cycle(len(answered), t_rel)
        result.seconds = time.perf_counter() - start
        result.failed += len(requests) - len(answered)  # never answered: lost
        peaks = [c.peak_memory_bytes for c in cycles if c.peak_memory_bytes is not None]
        result.peak_memory_bytes = max(peaks) if peaks else None
        return result, cycles

    def _next_batch(
        self,
        waiting: deque[GenerationRequest],
        buffer: list[GenerationRequest],
        settings: ControlSettings,
    ) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
        """(the batch, the buffer left): the worker's look-ahead, then its scheduler."""
        want = max(1, int(settings.batch_size * self.lookahead))
        while waiting and len(buffer) < want:
            buffer.append(waiting.popleft())
        chosen = select_batch(buffer, settings.batch_size, None, settings.max_seq_len)
        ids = {r.id for r in chosen}
        return chosen, [r for r in buffer if r.id not in ids]

    def _feedback(
        self, loop: ClosedLoop, ran: _Batch, settings: ControlSettings, depth: int, t_rel: float
    ) -> ControlSettings:
        """Show the policy this cycle; the settings for the next batch (applied)."""
        stats = self._cycle_stats(ran, settings, depth)
        events = [self._oom_event(o, settings) for o in ran.ooms]
        new = loop.observe(stats, events, t_rel)
        if new is None:
            return settings
        self._apply(new)
        return new

    def _apply(self, settings: ControlSettings) -> None:
        if settings.precision != self.engine.precision:
            self.engine.set_precision(settings.precision)

    def _run_batch(self, batch: list[GenerationRequest], settings: ControlSettings) -> _Batch:
        cap = min(settings.max_seq_len, self.engine.loaded.context_length)
        limits = BatchLimits(max_seq_len=cap, ignore_eos=True)
        ooms: list[OomInfo] = []
        began = time.perf_counter()
        outcomes = run_with_oom_guard(
            lambda part: self.engine.run(part, limits),
            batch,
            on_oom=ooms.append,
            on_fail=self.engine.fail,
        )
        sync(self.device)
        combined = combine_outcomes(outcomes, self.engine.precision)
        return _Batch(batch, combined, ooms, time.perf_counter() - began)

    def _record(
        self,
        ran: _Batch,
        settings: ControlSettings,
        t_rel: float,
        answered: dict[str, bool],
        result: RunResult,
    ) -> CycleRecord:
        failed = [o for o in ran.outcome.results if o.finish_reason == "error"]
        good = [o for o in ran.outcome.results if o.finish_reason != "error"]
        for o in ran.outcome.results:
            answered[o.request_id] = o.finish_reason != "error"
        tokens = sum(o.completion_tokens for o in good)
        recoveries = sum(1 for o in ran.ooms if o.recovered)
        result.completed += len(good)
        result.failed += len(failed)
        result.tokens += tokens
        result.oom_events += len(ran.ooms)
        result.recoveries += recoveries
        return CycleRecord(
            t_end=round(t_rel, 4),
            seconds=round(ran.seconds, 4),
            batch_size=len(ran.requests),
            batch_setting=settings.batch_size,
            tokens=tokens,
            failed=len(failed),
            oom_events=len(ran.ooms),
            recoveries=recoveries,
            max_prompt_len=max(r.prompt_len for r in ran.requests),
            peak_memory_bytes=ran.outcome.memory_peak_bytes,
            precision=ran.outcome.precision,
            max_seq_len=settings.max_seq_len,
        )

    def _cycle_stats(self, ran: _Batch, settings: ControlSettings, queue_depth: int) -> CycleStats:
        ctx = CycleContext(
            worker_id=WORKER_ID, device=self.device, settings=settings, latency_s=ran.seconds,
            queue_depth=queue_depth, oom_events=len(ran.ooms),
        )  # fmt: skip
        return cycle_stats(ran.outcome, ran.requests, ctx)

    def _oom_event(self, info: OomInfo, settings: ControlSettings) -> OomEvent:
        return OomEvent(
            worker_id=WORKER_ID,
            batch_size=info.batch_size,
            max_prompt_len=info.max_prompt_len,
            max_new_tokens=info.max_new_tokens,
            precision=self.engine.precision,
            settings_version=settings.version,
            recovered=info.recovered,
            action=info.action,
            message=info.message,
        )


def cycles_dicts(cycles: Sequence[CycleRecord]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cycles]


def timeline(cycles: Sequence[CycleRecord]) -> list[list[float]]:
    """``[start, end, tokens]`` per cycle, seconds since the run began (see rate_between)."""
    return [[max(0.0, c.t_end - c.seconds), c.t_end, c.tokens] for c in cycles]
