"""One cycle's figures (:class:`CycleStats`) from the engine's outcome of a batch.

Shared by the worker loop and the benchmark's in-process runner, so both report a
cycle the same way; the device's memory as the driver sees it comes from here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.worker.engine import BatchOutcome
from shared.schemas import ControlSettings, CycleStats, GenerationRequest, now


@dataclass
class DeviceMemory:
    """What the worker knows of its GPU's memory (all None on CPU)."""

    nvml_used_bytes: int | None = None
    nvml_total_bytes: int | None = None
    utilization_pct: float | None = None


def gpu_index(device: str) -> int | None:
    """``cuda:N`` -> N, ``cuda`` -> 0, anything else -> None."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":")[1]) if ":" in device else 0


def device_memory(device: str) -> DeviceMemory:
    """Used/total memory of the GPU as the driver sees it (other processes included)."""
    index = gpu_index(device)
    if index is None:
        return DeviceMemory()
    import torch

    free, total = torch.cuda.mem_get_info(index)
    try:
        utilization: float | None = float(torch.cuda.utilization(index))
    except Exception:  # NVML missing or not supported: utilisation stays unknown
        utilization = None
    return DeviceMemory(int(total - free), int(total), utilization)


@dataclass
class CycleContext:
    """What the cycle's figures need beyond the engine's outcome."""

    worker_id: str
    device: str
    settings: ControlSettings
    latency_s: float
    queue_depth: int = 0
    oom_events: int = 0
    precision_saved_bytes: int | None = None


def cycle_stats(
    outcome: BatchOutcome, requests: Sequence[GenerationRequest], ctx: CycleContext
) -> CycleStats:
    """The record of one batch; ``outcome`` is the combined one when the OOM guard split it.

    Request latency percentiles run from each request's enqueue time to now.
    """
    finished = now()
    e2e = sorted(finished - r.enqueued_at for r in requests)
    memory = device_memory(ctx.device)
    return CycleStats(
        worker_id=ctx.worker_id,
        gpu_index=gpu_index(ctx.device),
        settings_version=ctx.settings.version,
        settings_reason=ctx.settings.reason,
        batch_size=len(requests),
        max_prompt_len=max(r.prompt_len for r in requests),
        mean_prompt_len=sum(r.prompt_len for r in requests) / len(requests),
        max_new_tokens=max(r.params.max_tokens for r in requests),
        precision=outcome.precision,
        max_seq_len=ctx.settings.max_seq_len,
        tokens_generated=outcome.tokens_generated,
        tokens_per_s=outcome.tokens_generated / ctx.latency_s if ctx.latency_s > 0 else 0.0,
        latency_s=ctx.latency_s,
        latency_p50_s=_percentile(e2e, 0.50),
        latency_p95_s=_percentile(e2e, 0.95),
        padding_ratio=outcome.padding_ratio,
        memory_allocated_bytes=outcome.memory_allocated_bytes,
        memory_peak_bytes=outcome.memory_peak_bytes,
        memory_reserved_bytes=outcome.memory_reserved_bytes,
        nvml_used_bytes=memory.nvml_used_bytes,
        nvml_total_bytes=memory.nvml_total_bytes,
        gpu_utilization_pct=memory.utilization_pct,
        queue_depth=ctx.queue_depth,
        oom_events=ctx.oom_events,
        precision_saved_bytes=ctx.precision_saved_bytes,
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]
