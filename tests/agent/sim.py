"""A simulated worker on a simulated GPU, for driving the policy with synthetic traces.

Its memory follows a known linear law (``true`` coefficients, which differ from the
policy's prior), it OOMs when the peak does not fit next to the other processes, and
its tokens/s follow a chosen curve of the batch size.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from services.agent.memory_model import PRECISION_SCALE, Coefficients
from services.agent.policy import (
    AgentPolicy,
    MemoryView,
    Observation,
    PolicyDecision,
    WorkerControlState,
)
from shared.schemas import ControlSettings, CycleStats, DecisionAction, OomEvent

GIB = 1 << 30
OVERHEAD = 512 << 20


def saturating(batch: int) -> float:
    """tokens/s that keep improving with the batch, with diminishing returns."""
    return 4000.0 * batch / (batch + 64)


@dataclass
class SimWorker:
    true: Coefficients = field(default_factory=lambda: Coefficients(2.2e9, 40_000.0, 256_000.0))
    total: int = 16 * GIB
    other: int = 0
    prompt_len: int = 1000
    new_tokens: int = 200
    tps: Callable[[int], float] = saturating
    noise: float = 0.0  # relative noise of measured peaks and tokens/s
    queue_depth: int = 1000
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    last_peak: float = 0.0
    ooms: list[tuple[int, int]] = field(default_factory=list)

    def peak(self, batch: int, seq_len: int, precision: str) -> float:
        b, v = PRECISION_SCALE[precision]
        t = self.true
        return b * t.base + v * batch * (t.per_token * seq_len + t.per_row)

    def fits(self, batch: int, seq_len: int, precision: str) -> bool:
        return self.peak(batch, seq_len, precision) + self.other + OVERHEAD <= self.total

    def run(self, s: ControlSettings, ts: float, batch: int | None = None) -> CycleStats | OomEvent:
        """One cycle at settings ``s`` (``batch`` overrides the rows pulled)."""
        rows = min(s.batch_size, batch) if batch else s.batch_size
        prompt = min(self.prompt_len, s.max_seq_len - self.new_tokens)
        seq = prompt + self.new_tokens
        if not self.fits(rows, seq, s.precision):
            self.ooms.append((rows, seq))
            return OomEvent(
                ts=ts, worker_id="w1", batch_size=rows, max_prompt_len=prompt,
                max_new_tokens=self.new_tokens, precision=s.precision,
                settings_version=s.version, recovered=True, action="split",
            )  # fmt: skip
        self.last_peak = self.peak(rows, seq, s.precision) * (1 + self.rng.gauss(0, self.noise))
        tps = self.tps(rows) * (1 + self.rng.gauss(0, self.noise))
        return CycleStats(
            ts=ts, worker_id="w1", settings_version=s.version, batch_size=rows,
            max_prompt_len=prompt, mean_prompt_len=prompt, max_new_tokens=self.new_tokens,
            precision=s.precision, max_seq_len=s.max_seq_len,
            tokens_generated=rows * self.new_tokens, tokens_per_s=tps, latency_s=1.0,
            padding_ratio=0.0, memory_peak_bytes=int(self.last_peak),
            memory_reserved_bytes=int(self.last_peak), queue_depth=self.queue_depth,
        )  # fmt: skip

    def view(self) -> MemoryView:
        used = int(self.other + OVERHEAD + self.last_peak)
        return MemoryView(self.total, used, self.other, used - self.other)

    def pressure(self) -> float:
        # The worker's share of the room other processes leave it (as the policy reads it).
        return (OVERHEAD + self.last_peak) / (self.total - self.other)


@dataclass
class Trace:
    decisions: list[tuple[float, PolicyDecision]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    pressures: list[float] = field(default_factory=list)

    def actions(self) -> list[DecisionAction]:
        return [d.action for _, d in self.decisions]


def step(
    policy: AgentPolicy, state: WorkerControlState, sim: SimWorker, ts: float, trace: Trace,
    batch: int | None = None,
) -> PolicyDecision | None:  # fmt: skip
    """Run one simulated cycle and let the policy decide on it."""
    event = sim.run(state.settings, ts, batch)
    cycles = [event] if isinstance(event, CycleStats) else []
    ooms = [event] if isinstance(event, OomEvent) else []
    decision = policy.decide(state, Observation(ts, sim.view(), cycles, ooms))
    if decision is not None:
        trace.decisions.append((ts, decision))
    trace.batches.append(state.settings.batch_size)
    if cycles:
        trace.pressures.append(sim.pressure())
    return decision


def drive(
    policy: AgentPolicy, state: WorkerControlState, sim: SimWorker, steps: int,
    start: float = 0.0, dt: float = 1.0, trace: Trace | None = None,
) -> Trace:  # fmt: skip
    trace = trace or Trace()
    for i in range(steps):
        step(policy, state, sim, start + i * dt, trace)
    return trace


def new_state(
    batch: int = 4, precision: str = "bf16", max_seq_len: int = 2048
) -> WorkerControlState:
    settings = ControlSettings(
        version=1, batch_size=batch, precision=precision,  # type: ignore[arg-type]
        max_seq_len=max_seq_len,
    )  # fmt: skip
    return WorkerControlState("w1", settings)
