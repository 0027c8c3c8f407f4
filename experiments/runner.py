"""AEGIS in-process: the worker's serving loop over a request list, static or closed-loop.

:class:`AegisRunner` drives the engine core through the same
:class:`~services.worker.loop.ServingLoop` the worker runs, with in-memory I/O instead of
Redis: requests arrive all at once or at given times, answers are counted as they
finish, and a window of steps is recorded every ``record_interval_s``. With a
:class:`ClosedLoop` the agent's policy sees every window (CycleStats, OOM events, the
GPU's memory as the driver reports it) and its decisions apply between steps, as the
real worker applies the control hash.
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
    MemoryView,
    Observation,
    PolicyConfig,
    PolicyDecision,
    WorkerControlState,
    cycle_memory_view,
)
from services.worker.core.engine import EngineCore, StepOutput
from services.worker.loop import ServingLoop
from services.worker.oom import OomInfo
from services.worker.window import StepWindow, WindowContext
from shared.schemas import ControlSettings, CycleStats, GenerationRequest, OomEvent, now

WORKER_ID = "bench"
OnCycle = Callable[[int, float], None]  # (requests answered so far, seconds since start)


@dataclass
class CycleRecord:
    """One window of steps of a run, for timelines and plots (seconds since the start)."""

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
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    kv_pool_bytes: int = 0


@dataclass
class ClosedLoop:
    """The agent's policy in the loop: one observation per window, decisions applied."""

    policy: AgentPolicy
    state: WorkerControlState
    decisions: list[dict[str, Any]] = field(default_factory=list)
    # The GPU as the agent sees it, from a window (default: the worker's own NVML reading;
    # a benchmark on CPU gives a virtual card here).
    memory_view: Callable[[CycleStats], MemoryView | None] | None = None

    @classmethod
    def start(
        cls, settings: ControlSettings, config: PolicyConfig, prior: Coefficients
    ) -> ClosedLoop:
        state = WorkerControlState(WORKER_ID, settings, model=MemoryModel(prior=prior))
        return cls(AgentPolicy(config), state)

    def observe(
        self, cycle: CycleStats, ooms: Sequence[OomEvent], t_rel: float
    ) -> ControlSettings | None:
        """Feed one window; the new settings when the policy changed them."""
        if self.memory_view is not None:
            memory = self.memory_view(cycle)
        else:
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
class RequestTiming:
    """One answered request, seconds since the run started."""

    arrived: float
    first_token: float | None
    finished: float
    tokens: int
    error: str | None


class _BenchIO:
    """The serving loop's I/O over a list of requests (``LoopIO``)."""

    def __init__(
        self,
        runner: AegisRunner,
        requests: Sequence[GenerationRequest],
        arrivals: Sequence[float] | None,
        settings: ControlSettings,
        loop: ClosedLoop | None,
        on_cycle: OnCycle | None,
        bar: Bar | None,
    ) -> None:
        self.runner = runner
        times = arrivals if arrivals is not None else [0.0] * len(requests)
        self.pending = deque(sorted(zip(times, requests, strict=True), key=lambda p: p[0]))
        self.settings = settings
        self.closed = loop
        self.on_cycle = on_cycle
        self.bar = bar
        self.start = time.perf_counter()
        self.wall_start = now()
        self.timings: dict[str, RequestTiming] = {}
        self.arrived: dict[str, float] = {}  # request id -> its arrival (s after the start)
        self.cycles: list[CycleRecord] = []
        self.ooms: list[OomInfo] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def current_settings(self) -> ControlSettings:
        return self.settings

    def pull(self, count: int, block: bool) -> list[GenerationRequest]:
        if block and self.pending:
            time.sleep(max(0.0, self.pending[0][0] - self.elapsed()))
        taken: list[GenerationRequest] = []
        while self.pending and len(taken) < count and self.pending[0][0] <= self.elapsed():
            arrival, request = self.pending.popleft()  # latency counts from the arrival
            self.arrived[request.id] = arrival
            taken.append(request.model_copy(update={"enqueued_at": self.wall_start + arrival}))
        return taken

    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set()

    def deliver(self, output: StepOutput) -> None:
        if output.stats.oom is not None:
            self.ooms.append(output.stats.oom)
        for outcome in output.finished:
            offset = self.wall_start
            arrived = self.arrived.pop(outcome.request_id)
            first = outcome.first_token_at - offset if outcome.first_token_at else None
            self.timings[outcome.request_id] = RequestTiming(
                arrived, first, outcome.finished_at - offset, outcome.completion_tokens,
                outcome.error,
            )  # fmt: skip
        if self.bar is not None and output.finished:
            self.bar.update(len(output.finished))

    def record(self, window: StepWindow, loop: ServingLoop) -> None:
        ooms = list(window.ooms)
        failed = sum(1 for o, _ in window.finished if o.finish_reason == "error")
        seconds = time.perf_counter() - window.started
        ctx = WindowContext(WORKER_ID, self.runner.device, loop.applied, len(self.pending))
        ctx.precision_saved_bytes = self.runner.core.take_precision_saved()
        cycle = window.flush(self.runner.core.stats(), ctx)
        t_rel = self.elapsed()
        self.cycles.append(_cycle_record(cycle, ooms, failed, seconds, t_rel, self.settings))
        if self.closed is not None:
            events = [o.to_event(WORKER_ID, None, cycle.precision, cycle.settings_version)
                      for o in ooms]  # fmt: skip
            new = self.closed.observe(cycle, events, t_rel)
            if new is not None:
                version = self.settings.version + 1
                self.settings = new.model_copy(update={"version": version})
        if self.on_cycle is not None:
            self.on_cycle(len(self.timings), t_rel)


class AegisRunner:
    """Runs request lists through AEGIS's engine core as the worker loop would."""

    def __init__(self, core: EngineCore, device: str, record_interval_s: float = 0.25) -> None:
        self.core = core
        self.device = device
        self.record_interval_s = record_interval_s

    def run(
        self,
        requests: Sequence[GenerationRequest],
        settings: ControlSettings,
        system: str = "aegis",
        loop: ClosedLoop | None = None,
        on_cycle: OnCycle | None = None,
        bar: Bar | None = None,
        arrivals: Sequence[float] | None = None,
        keep_timings: bool = False,
    ) -> tuple[RunResult, list[CycleRecord]]:
        """Answer every request; the result counts lost (unanswered) ones as failed.

        ``arrivals``: seconds after the start at which each request arrives (all at
        once when None). With ``keep_timings`` each request's arrival, first token and
        finish land in ``result.extra["timings"]``.
        """
        io = _BenchIO(self, requests, arrivals, settings, loop, on_cycle, bar)
        serving = ServingLoop(self.core, io, self.record_interval_s)
        preempted = self.core.stats().preemptions
        # The run's settings and their graphs before the clock, as a worker starts: a
        # pool resized here used to re-capture its graphs inside the timed run.
        serving.prepare()
        sync(self.device)
        io.start, io.wall_start = time.perf_counter(), now()
        while io.pending or self.core.has_work:
            serving.iterate()
        serving.flush()
        sync(self.device)
        result = RunResult(system, len(requests), batch_size=settings.batch_size)
        result.seconds = io.elapsed()
        self._count(result, io, len(requests))
        result.extra["preemptions"] = self.core.stats().preemptions - preempted
        if keep_timings:
            result.extra["timings"] = [asdict(t) for t in io.timings.values()]
        peaks = [c.peak_memory_bytes for c in io.cycles if c.peak_memory_bytes is not None]
        result.peak_memory_bytes = max(peaks) if peaks else None
        return result, io.cycles

    @staticmethod
    def _count(result: RunResult, io: _BenchIO, total: int) -> None:
        good = [t for t in io.timings.values() if t.error is None]
        result.completed = len(good)
        result.failed = total - len(good)  # errors and never answered (lost)
        result.tokens = sum(t.tokens for t in good)
        result.oom_events = len(io.ooms)
        result.recoveries = sum(1 for o in io.ooms if o.recovered)


def _cycle_record(
    cycle: CycleStats, ooms: list[OomInfo], failed: int, seconds: float, t_rel: float,
    settings: ControlSettings,
) -> CycleRecord:  # fmt: skip
    return CycleRecord(
        t_end=round(t_rel, 4),
        seconds=round(seconds, 4),
        batch_size=cycle.batch_size,
        batch_setting=settings.batch_size,
        tokens=cycle.tokens_generated,
        failed=failed,
        oom_events=len(ooms),
        recoveries=sum(1 for o in ooms if o.recovered),
        max_prompt_len=cycle.max_prompt_len,
        peak_memory_bytes=cycle.memory_peak_bytes,
        precision=cycle.precision,
        max_seq_len=cycle.max_seq_len,
        running=cycle.running,
        waiting=cycle.waiting,
        kv_usage=round(cycle.kv_usage, 4),
        preemptions=cycle.preemptions,
        kv_pool_bytes=cycle.kv_pool_bytes or 0,
    )


def cycles_dicts(cycles: Sequence[CycleRecord]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cycles]


def timeline(cycles: Sequence[CycleRecord]) -> list[list[float]]:
    """``[start, end, tokens]`` per window, seconds since the run began (see rate_between)."""
    return [[max(0.0, c.t_end - c.seconds), c.t_end, c.tokens] for c in cycles]
