"""Step statistics summed over a window of engine steps into one :class:`CycleStats`.

The core runs hundreds of steps a second; the records, the agent and the dashboard see
one cycle per window (``record_interval_s``): tokens, prefill and decode tokens,
preemptions, OOMs, running/waiting sequences and KV blocks at the window's end, the most
sequences that ran at once, time-to-first-token and inter-token latency percentiles,
and the end-to-end latency of the requests that finished in it. Shared by the worker
and the benchmark runner, so both report a window the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.worker.core.engine import CoreStats, StepOutput
from services.worker.oom import OomInfo
from services.worker.rows import RequestOutcome
from services.worker.stats import device_memory, gpu_index, gpu_uuid
from shared.schemas import ControlSettings, CycleStats, GenerationRequest, now


@dataclass
class WindowContext:
    """What a window's record needs beyond the steps."""

    worker_id: str
    device: str
    settings: ControlSettings
    queue_depth: int = 0
    precision_saved_bytes: int | None = None


@dataclass
class StepWindow:
    """Steps since the last record. ``due()`` once ``interval_s`` has passed."""

    interval_s: float = 1.0
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    busy_s: float = 0.0
    tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    most_running: int = 0
    longest_prompt: int = 0
    longest_budget: int = 0
    prompt_sum: float = 0.0  # of the steps' mean running prompt lengths
    shaped_steps: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    finished: list[tuple[RequestOutcome, GenerationRequest]] = field(default_factory=list)
    ooms: list[OomInfo] = field(default_factory=list)

    def add(self, out: StepOutput, requests: dict[str, GenerationRequest]) -> None:
        """Count one step; ``requests`` maps the finished ids to their requests."""
        s = out.stats
        self.steps += 1
        self.busy_s += s.seconds
        self.tokens += s.sampled
        self.prefill_tokens += s.prefill_tokens
        self.decode_tokens += s.decode_tokens
        self.preemptions += s.preemptions
        self.most_running = max(self.most_running, s.running)
        if s.running:
            self.longest_prompt = max(self.longest_prompt, s.max_prompt_len)
            self.longest_budget = max(self.longest_budget, s.max_new_tokens)
            self.prompt_sum += s.mean_prompt_len
            self.shaped_steps += 1
        self.ttft += s.ttft_s
        self.itl += s.itl_s
        self.finished += [(o, requests[o.request_id]) for o in out.finished]
        if s.oom is not None:
            self.ooms.append(s.oom)

    def due(self) -> bool:
        return self.steps > 0 and time.perf_counter() - self.started >= self.interval_s

    def flush(self, core: CoreStats, ctx: WindowContext) -> CycleStats:
        """The window's record; the window starts again."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        cycle = self._record(core, ctx, elapsed)
        self.__init__(interval_s=self.interval_s)  # type: ignore[misc]
        return cycle

    def _mean_prompt(self, done: list[GenerationRequest]) -> float:
        if self.shaped_steps:
            return self.prompt_sum / self.shaped_steps
        return sum(r.prompt_len for r in done) / len(done) if done else 0.0

    def _record(self, core: CoreStats, ctx: WindowContext, elapsed: float) -> CycleStats:
        done = [r for _, r in self.finished]
        e2e = sorted(max(0.0, o.finished_at - r.enqueued_at) for o, r in self.finished)
        memory = device_memory(ctx.device)
        held = _held_bytes(core)
        return CycleStats(
            worker_id=ctx.worker_id,
            gpu_index=gpu_index(ctx.device),
            gpu_uuid=gpu_uuid(ctx.device),
            settings_version=ctx.settings.version,
            settings_reason=ctx.settings.reason,
            batch_size=self.most_running,
            # The sequences that ran in the window (as a batch's shape was), else those
            # that finished in it.
            max_prompt_len=max(self.longest_prompt, *(r.prompt_len for r in done), 0),
            mean_prompt_len=self._mean_prompt(done),
            max_new_tokens=max(self.longest_budget, *(r.params.max_tokens for r in done), 0),
            precision=core.precision,
            max_seq_len=core.limits.max_seq_len,
            tokens_generated=self.tokens,
            tokens_per_s=self.tokens / elapsed,
            latency_s=elapsed,
            latency_p50_s=percentile(e2e, 0.50),
            latency_p95_s=percentile(e2e, 0.95),
            padding_ratio=0.0,
            memory_allocated_bytes=held[0],
            memory_peak_bytes=held[1],
            memory_reserved_bytes=_reserved(ctx.device),
            nvml_used_bytes=memory.nvml_used_bytes,
            nvml_total_bytes=memory.nvml_total_bytes,
            gpu_utilization_pct=memory.utilization_pct,
            queue_depth=ctx.queue_depth,
            oom_events=len(self.ooms),
            precision_saved_bytes=ctx.precision_saved_bytes,
            steps=self.steps,
            requests_finished=len(self.finished),
            running=core.running,
            waiting=core.waiting,
            kv_blocks_used=core.kv_blocks_used,
            kv_blocks_total=core.kv_blocks_total,
            kv_usage=core.kv_usage,
            kv_pool_bytes=core.kv_bytes,
            preemptions=self.preemptions,
            prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens,
            step_time_mean_s=self.busy_s / self.steps if self.steps else None,
            ttft_p50_s=percentile(sorted(self.ttft), 0.50),
            ttft_p95_s=percentile(sorted(self.ttft), 0.95),
            itl_p50_s=percentile(sorted(self.itl), 0.50),
            itl_p95_s=percentile(sorted(self.itl), 0.95),
            max_batched_tokens=core.limits.max_batched_tokens,
            ts=now(),
        )


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when there are none)."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


def _held_bytes(core: CoreStats) -> tuple[int | None, int | None]:
    """(weights + KV in use, that + the activation peak): memory that follows the tokens
    held, which is what the agent's watermarks judge (the pool itself is reserved once)."""
    if core.memory is None:
        return None, None
    block_bytes = core.kv_bytes // max(1, core.kv_blocks_total)
    held = core.memory.weights + core.kv_blocks_used * block_bytes
    return held, held + core.memory.activation_peak


def _reserved(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.memory_reserved(torch.device(device)))
