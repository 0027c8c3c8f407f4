"""Records a small, known history into a database, for the dashboard's tests.

Two workers on host ``h1``: ``w1`` (synthetic model, GPU 0) and ``w2`` (real model,
GPU 1); ten minutes of cycles and telemetry, three decisions, one OOM in the last
15 minutes and one two hours ago. :data:`EXPECTED` holds what the headline must show
for a 15 minute window.
"""

from __future__ import annotations

from shared.db import Records
from shared.schemas import (
    ControlSettings,
    CycleStats,
    Decision,
    DecisionAction,
    GpuSample,
    OomEvent,
    TelemetrySample,
    WorkerInfo,
)

GIB = 1 << 30
REASONS = {
    "grow": "memory 42% < 60%: grow batch 8 -> 16",
    "halve": "OOM at batch 32: halve to 16",
    "precision": "memory 88% > 85%: precision bf16 -> fp16",
}
EXPECTED = {
    "Tokens/s now": "200.5",
    "Batch size": "16/8",
    "Precision": "bf16/fp16",
    "Settings version": "3/2",
    "OOMs in window": "1",
    "Queue depth": "5",
}


def _cycle(ts: float, worker: str, gpu: int, i: int, **final: object) -> CycleStats:
    values: dict[str, object] = {
        "batch_size": 8 + (i % 3) * 4,
        "precision": "bf16",
        "settings_version": 1,
        "tokens_per_s": 60.0 + 2 * i,
        "queue_depth": i % 4,
    }
    values.update(final)
    return CycleStats(
        ts=ts,
        worker_id=worker,
        gpu_index=gpu,
        max_prompt_len=64,
        mean_prompt_len=40.0,
        max_new_tokens=32,
        max_seq_len=2048,
        tokens_generated=256,
        latency_s=1.5,
        latency_p50_s=0.8 + 0.01 * i,
        latency_p95_s=1.4 + 0.01 * i,
        padding_ratio=0.2,
        nvml_used_bytes=30 * GIB,
        nvml_total_bytes=80 * GIB,
        gpu_utilization_pct=70.0,
        **values,  # type: ignore[arg-type]
    )


def _cycles(now: float) -> list[CycleStats]:
    """30 cycles per worker over the last ~10 minutes; w1's is the latest of all."""
    out = []
    for i in range(30):
        ts = now - 600 + i * 20
        last = i == 29
        w1 = {"batch_size": 16, "settings_version": 3, "tokens_per_s": 120.5, "queue_depth": 5}
        w2 = {"batch_size": 8, "precision": "fp16", "settings_version": 2, "tokens_per_s": 80.0}
        out.append(_cycle(ts, "w1", 0, i, **(w1 if last else {})))
        out.append(_cycle(ts - 5, "w2", 1, i, **(w2 if last else {"tokens_per_s": 40.0 + i})))
    out.append(_cycle(now - 7200, "w1", 0, 0, tokens_per_s=9999.0))  # outside 15 min
    return out


def _decisions(now: float) -> list[Decision]:
    def settings(version: int, batch: int, precision: str = "bf16") -> ControlSettings:
        return ControlSettings(version=version, batch_size=batch, precision=precision)  # type: ignore[arg-type]

    return [
        Decision(
            ts=now - 500,
            worker_id="w1",
            action=DecisionAction.GROW,
            reason=REASONS["grow"],
            before=settings(1, 8),
            after=settings(2, 16),
            inputs={"memory_pct": 42.0},
        ),
        Decision(
            ts=now - 200,
            worker_id="w1",
            action=DecisionAction.HALVE,
            reason=REASONS["halve"],
            before=settings(2, 32),
            after=settings(3, 16),
        ),
        Decision(
            ts=now - 300,
            worker_id="w2",
            action=DecisionAction.PRECISION,
            reason=REASONS["precision"],
            before=settings(1, 8),
            after=settings(2, 8, "fp16"),
        ),
    ]


def _telemetry(now: float) -> list[TelemetrySample]:
    samples = []
    for i in range(30):
        gpus = [
            GpuSample(
                index=index,
                name="NVIDIA H100",
                memory_used_bytes=(20 + i + 10 * index) * GIB,
                memory_total_bytes=80 * GIB,
                utilization_pct=50.0 + i - 20 * index,
                power_w=300.0,
            )
            for index in (0, 1)
        ]
        samples.append(TelemetrySample(ts=now - 600 + i * 20, host="h1", gpu="nvml", gpus=gpus))
    return samples


def seed(records: Records, now: float) -> None:
    """Write the known history ending at ``now``."""
    records.upsert_worker(
        WorkerInfo(
            worker_id="w1",
            host="h1",
            pid=11,
            device="cuda:0",
            gpu_index=0,
            gpu_name="NVIDIA H100",
            model="synthetic:tiny",
            synthetic=True,
            started_at=now - 900,
        )
    )
    records.upsert_worker(
        WorkerInfo(
            worker_id="w2",
            host="h1",
            pid=12,
            device="cuda:1",
            gpu_index=1,
            gpu_name="NVIDIA H100",
            model="TinyLlama",
            synthetic=False,
            started_at=now - 900,
        )
    )
    records.add_cycles(_cycles(now))
    records.add_decisions(_decisions(now))
    records.add_oom_events(
        [
            OomEvent(
                ts=now - 210,
                worker_id="w1",
                gpu_index=0,
                batch_size=32,
                max_prompt_len=64,
                max_new_tokens=32,
                precision="bf16",
                settings_version=2,
                recovered=True,
                action="split batch 32 -> 2 x 16",
                message="CUDA out of memory",
            ),
            OomEvent(
                ts=now - 7200,
                worker_id="w1",
                gpu_index=0,
                batch_size=64,
                max_prompt_len=64,
                max_new_tokens=32,
                precision="bf16",
                settings_version=1,
                recovered=True,
                action="split",
                message="old OOM",
            ),
        ]
    )
    records.add_telemetry(_telemetry(now))
