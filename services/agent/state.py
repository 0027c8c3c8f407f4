"""The policy's data: its configuration, what it observes, what it remembers, what it
decides. Plain dataclasses inside the agent; :meth:`PolicyDecision.to_schema` gives the
wire/record form (:class:`shared.schemas.Decision`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.agent.memory_model import MemoryModel
from shared.schemas import (
    ControlSettings,
    CycleStats,
    Decision,
    DecisionAction,
    GpuSample,
    OomEvent,
    Precision,
)

GIB = float(1 << 30)
Inputs = dict[str, float | int | str | None]


@dataclass(frozen=True)
class PolicyConfig:
    """Every threshold of the policy (built from ``AgentSettings``)."""

    low_watermark: float = 0.60
    high_watermark: float = 0.85
    grow_target: float = 0.75  # grows aim the predicted peak at most here
    grow_factor: float = 2.0
    # With a backlog deeper than one stride, a grow may go up to this factor at once.
    backlog_grow_factor: float = 4.0
    shrink_factor: float = 0.75  # a shrink under pressure cuts at least this much
    min_batch: int = 1
    max_batch: int = 256
    min_seq_len: int = 128
    max_seq_len: int = 2048
    grow_cooldown_s: float = 10.0
    grow_cooldown_cycles: int = 3
    shrink_cooldown_s: float = 2.0
    shrink_cooldown_cycles: int = 1
    safety_margin: float = 0.05  # of total memory, kept free by the hard budget
    oom_margin: float = 0.8  # never grow past this fraction of a batch that OOMed
    overhead_bytes: int = 512 << 20  # CUDA context and allocator slack outside the peak
    neighbour_min_bytes: int = 256 << 20  # a change of other processes' memory that counts
    throughput_gain_min: float = 0.05  # a grow must raise tokens/s by this to continue
    plateau_hold_s: float = 300.0  # after backing off, no growth above the best for this
    pressure_hold_s: float = 120.0  # after a watermark shrink, no growth back for this
    high_confirm_cycles: int = 2  # cycles in a row above the high watermark to shrink
    grow_eval_timeout_s: float = 120.0
    full_batch_fraction: float = 0.9  # a cycle this full (or with a queue) shows demand
    reduced_precision: Precision = "bf16"  # what fp32 is lowered to
    allow_int8: bool = False
    long_seq_factor: float = 2.0  # a cycle this much longer than typical is "long"
    long_seq_slowdown: float = 0.7  # long cycles below this x typical tokens/s degrade
    long_seq_cycles: int = 3  # degraded long cycles in the window before capping
    seq_relax_s: float = 60.0
    window_cycles: int = 20
    # The engine core's paged KV pool follows the room other processes leave it: it is
    # sized to this share of (total - other processes), less the worker's fixed memory.
    kv_target_fraction: float = 0.90
    kv_resize_min: float = 0.10  # a smaller relative change is not worth a resize
    min_kv_bytes: int = 256 << 20
    # Goodput: keep the p95 time to first token under this (None: no target). Levers, in
    # order: more slots when requests wait for one, a larger step token budget (prefill
    # gets more of each step, up to max_step_tokens), fewer sequences per step.
    ttft_target_ms: float | None = None
    max_step_tokens: int = 16384  # 2x the worker's default step: inside its profiled margin
    # Fewer sequences per step only when no request waited for a slot in this many recent
    # windows: else the wait only moves into the queue (an H200 burst: shrink and grow in
    # turn every half second, p95 0.73 s against 0.40 s with no target).
    ttft_queue_cycles: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark < self.grow_target < self.high_watermark < 1:
            raise ValueError("need 0 < low_watermark < grow_target < high_watermark < 1")
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError("need 1 <= min_batch <= max_batch")
        if not 16 <= self.min_seq_len <= self.max_seq_len:
            raise ValueError("need 16 <= min_seq_len <= max_seq_len")
        if self.reduced_precision not in ("bf16", "fp16"):
            raise ValueError("reduced_precision must be bf16 or fp16")


@dataclass(frozen=True)
class MemoryView:
    """One GPU as the worker sees it: total, used by all, used by other processes."""

    total_bytes: int
    used_bytes: int
    other_bytes: int
    own_bytes: int | None = None
    # Other AEGIS workers on this GPU (their memory is part of other_bytes): the KV pool
    # rule splits the GPU with them instead of taking what they hold as lost.
    peer_workers: int = 0
    peer_bytes: int = 0


def memory_view(
    gpu: GpuSample, pid: int | None, cycle: CycleStats | None, overhead_bytes: int
) -> MemoryView:
    """Split a GPU's memory into this worker's and everyone else's.

    NVML's per-pid memory is used when the worker's pid is among the GPU's processes
    (not so in containers with their own pid namespace); otherwise the worker's share is
    estimated from its last cycle (reserved or peak bytes plus overhead).
    """
    procs = gpu.process_memory_bytes
    if pid is not None and pid in procs:
        other = sum(v for p, v in procs.items() if p != pid)
        return MemoryView(gpu.memory_total_bytes, gpu.memory_used_bytes, other, procs[pid])
    own = None
    if cycle is not None:
        held = cycle.memory_reserved_bytes or cycle.memory_peak_bytes
        own = held + overhead_bytes if held else None
    other = max(0, gpu.memory_used_bytes - own) if own is not None else 0
    return MemoryView(gpu.memory_total_bytes, gpu.memory_used_bytes, other, own)


def cycle_memory_view(cycle: CycleStats, overhead_bytes: int) -> MemoryView | None:
    """The GPU as the worker's own NVML reading in a cycle shows it (no monitor running)."""
    if not cycle.nvml_total_bytes or cycle.nvml_used_bytes is None:
        return None
    held = cycle.memory_reserved_bytes or cycle.memory_peak_bytes
    own = held + overhead_bytes if held else None
    other = max(0, cycle.nvml_used_bytes - own) if own is not None else 0
    return MemoryView(cycle.nvml_total_bytes, cycle.nvml_used_bytes, other, own)


@dataclass
class Observation:
    """What the agent saw of one worker since the last decision."""

    ts: float
    memory: MemoryView | None = None
    cycles: Sequence[CycleStats] = ()
    ooms: Sequence[OomEvent] = ()


@dataclass
class WorkerControlState:
    """The policy's memory of one worker; ``settings`` mirrors the control hash."""

    worker_id: str
    settings: ControlSettings
    model: MemoryModel = field(default_factory=MemoryModel)
    last_change_ts: float = -math.inf
    cycles_since_change: int = 0
    oom_shapes: list[tuple[int, int]] = field(default_factory=list)
    version_batch: dict[int, int] = field(default_factory=dict)  # settings version -> batch
    throughput: dict[tuple[int, int], float] = field(default_factory=dict)
    recent: deque[CycleStats] = field(default_factory=lambda: deque(maxlen=20))
    grow_from: tuple[int, int, float] | None = None  # (batch, length bucket, when)
    # Length bucket -> (batch not to grow past, until when, hold that was used).
    ceilings: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    pressures: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    last_other_bytes: int | None = None
    last_degraded_ts: float = -math.inf
    seq_caps: int = 0  # times the length was capped: each makes relaxing wait longer
    # The served model's context: the worker never runs longer, so relaxing stops there.
    context_length: int | None = None

    def __post_init__(self) -> None:
        self.version_batch[self.settings.version] = self.settings.batch_size

    def adopt(self, settings: ControlSettings, ts: float) -> None:
        """Take ``settings`` as current (after a write, or an outside change)."""
        if settings.precision != self.settings.precision:
            # Throughput and limits learnt at another precision no longer apply.
            self.throughput.clear()
            self.ceilings.clear()
            self.grow_from = None
        if settings.max_seq_len < self.settings.max_seq_len:
            self.seq_caps += 1
        self.settings = settings
        self.version_batch[settings.version] = settings.batch_size
        self.last_change_ts = ts
        self.cycles_since_change = 0


@dataclass(frozen=True)
class PolicyDecision:
    """A settings change with its reason and inputs; see :meth:`to_schema`."""

    action: DecisionAction
    reason: str
    before: ControlSettings
    after: ControlSettings
    inputs: Inputs

    def to_schema(self, worker_id: str, ts: float) -> Decision:
        """The wire/record form."""
        return Decision(
            ts=ts,
            worker_id=worker_id,
            action=self.action,
            reason=self.reason,
            before=self.before,
            after=self.after,
            inputs=dict(self.inputs),
        )

    def summary(self) -> str:
        """``batch 16->32`` (and/or precision, max_seq_len, max_batched_tokens, KV budget)
        followed by the reason."""
        b, a = self.before, self.after
        parts = [
            f"{name} {x}->{y}"
            for name, x, y in (
                ("batch", b.batch_size, a.batch_size),
                ("precision", b.precision, a.precision),
                ("max_seq_len", b.max_seq_len, a.max_seq_len),
                ("max_batched_tokens", b.max_batched_tokens, a.max_batched_tokens),
                ("kv_budget", _gib_text(b.kv_budget_bytes), _gib_text(a.kv_budget_bytes)),
            )
            if x != y
        ]
        return f"{', '.join(parts) or 'no change'} ({self.reason})"


def _gib_text(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f}GiB" if nbytes else "auto"


def length_bucket(seq_len: int) -> int:
    """Next power of two: throughput and plateaus are compared within one bucket."""
    return 1 << max(0, math.ceil(math.log2(max(1, seq_len))))


def cycle_len(cycle: CycleStats | OomEvent) -> int:
    """Padded tokens per sequence of a batch (prompt padded to the longest + new)."""
    return cycle.max_prompt_len + cycle.max_new_tokens


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"
