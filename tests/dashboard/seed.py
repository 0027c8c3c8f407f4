"""Records a small, known history into a database, for the dashboard's tests.

Two workers on host ``h1``: ``w1`` (synthetic model, GPU 0) and ``w2`` (real model,
GPU 1); ten minutes of cycles (with the engine core's figures) and telemetry, three
decisions, one OOM in the last 15 minutes and one two hours ago, finished requests
(some cancelled, one two hours ago). :func:`seed_dead_letters` writes dead letters into
Redis. :data:`EXPECTED` holds what the headline must show for a 15 minute window.
"""

from __future__ import annotations

import redis

from shared.db import Records
from shared.keys import Keys
from shared.queue import FIELD
from shared.schemas import (
    ControlSettings,
    CycleStats,
    DeadLetter,
    Decision,
    DecisionAction,
    FinishReason,
    GpuSample,
    OomEvent,
    RequestRecord,
    SamplingParams,
    TelemetrySample,
    WorkerInfo,
    dump,
)

GIB = 1 << 30
REASONS = {
    "grow": "memory 42% < 60%: grow batch 8 -> 16",
    "halve": "OOM at batch 32: halve to 16",
    "precision": "memory 88% > 85%: precision bf16 -> fp16",
}
EXPECTED = {
    "Tokens/s now": "200.5",
    "Running / waiting": "18 / 3",  # w1 12 / 3 + w2 6 / 0
    "KV cache used": "62.5%",  # the higher of w1 62.5% and w2 50%
    "TTFT p95": "250 ms",  # the higher of w1 120 ms and w2 250 ms
    "Preemptions in window": "6",  # w1: one in every fifth cycle
    "Queue depth": "5",
    "Precision": "bf16/fp16",
    "Settings version": "3/2",
    "OOMs in window": "1",
    "Cancelled in window": "3",
    "Dead letters": "7",
}
# Blocks, pool bytes and last figures of each worker's engine core.
KV_BLOCKS = {"w1": 4096, "w2": 2048}
KV_POOL = {"w1": 2 * GIB, "w2": 1 * GIB}
LAST_CORE = {
    "w1": {"running": 12, "waiting": 3, "kv_blocks_used": 2560, "ttft_p95_s": 0.12},
    "w2": {"running": 6, "waiting": 0, "kv_blocks_used": 1024, "ttft_p95_s": 0.25},
}
DEAD_ERRORS = {"w1": "CUDA error: device-side assert", "w2": "tokenizer crashed"}


def _core(worker: str, i: int) -> dict[str, object]:
    """The engine core's figures of cycle ``i`` of ``worker``."""
    used = 1000 + 10 * i
    return {
        "steps": 50,
        "requests_finished": 4,
        "running": 8 + i % 3,
        "waiting": i % 2,
        "kv_blocks_used": used,
        "kv_blocks_total": KV_BLOCKS[worker],
        "kv_pool_bytes": KV_POOL[worker],
        "preemptions": 1 if worker == "w1" and i % 5 == 0 else 0,
        "prefill_tokens": 100 + i,
        "decode_tokens": 200 + i,
        "step_time_mean_s": 0.02,
        "ttft_p50_s": 0.05,
        "ttft_p95_s": 0.1 + 0.001 * i,
        "itl_p50_s": 0.01,
        "itl_p95_s": 0.02 + 0.001 * i,
        "max_batched_tokens": 2048,
        "memory_peak_bytes": (4 + i % 3) * GIB,
        "memory_reserved_bytes": 10 * GIB,
    }


def _cycle(ts: float, worker: str, gpu: int, i: int, **final: object) -> CycleStats:
    values: dict[str, object] = {
        "batch_size": 8 + (i % 3) * 4,
        "precision": "bf16",
        "settings_version": 1,
        "tokens_per_s": 60.0 + 2 * i,
        "queue_depth": i % 4,
        **_core(worker, i),
    }
    values.update(final)
    values["kv_usage"] = int(values["kv_blocks_used"]) / int(values["kv_blocks_total"])  # type: ignore[call-overload]
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
        padding_ratio=0.0,
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
        w1.update(LAST_CORE["w1"])
        w2.update(LAST_CORE["w2"])
        out.append(_cycle(ts, "w1", 0, i, **(w1 if last else {})))
        out.append(_cycle(ts - 5, "w2", 1, i, **(w2 if last else {"tokens_per_s": 40.0 + i})))
    # Outside 15 min.
    out.append(_cycle(now - 7200, "w1", 0, 0, tokens_per_s=9999.0, preemptions=50))
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


def _request(ts: float, worker: str, n: int, reason: FinishReason) -> RequestRecord:
    return RequestRecord(
        request_id=f"{worker}-{n}-{ts:.0f}",
        worker_id=worker,
        kind="completion",
        prompt_tokens=20,
        completion_tokens=0 if reason == "cancelled" else 16,
        finish_reason=reason,
        queued_at=ts - 2,
        started_at=ts - 1.5,
        first_token_at=ts - 1.4,
        finished_at=ts,
        settings_version=1,
    )


def _requests(now: float) -> list[RequestRecord]:
    """In 15 min: w1 1 cancelled and 1 error of 5, w2 2 cancelled of 4; one old cancel."""
    outcomes: dict[str, list[FinishReason]] = {
        "w1": ["stop", "length", "stop", "cancelled", "error"],
        "w2": ["stop", "cancelled", "stop", "cancelled"],
    }
    out = [
        _request(now - 400 + 30 * n, worker, n, reason)
        for worker, reasons in outcomes.items()
        for n, reason in enumerate(reasons)
    ]
    out.append(_request(now - 7200, "w1", 99, "cancelled"))
    return out


def dead_letter(ts: float, worker: str) -> DeadLetter:
    return DeadLetter(
        ts=ts,
        request_id=f"dead-{worker}-{ts:.0f}",
        entry_id="1-0",
        deliveries=3,
        error=DEAD_ERRORS.get(worker, "old failure"),
        worker_id=worker,
        model="synthetic:tiny",
        prompt_tokens=12,
        prompt_preview="Once upon a time",
        params=SamplingParams(max_tokens=16),
    )


def seed_dead_letters(client: redis.Redis, keys: Keys, now: float) -> None:
    """Three dead letters (one two hours old, then w1's and w2's now); 7 ever recorded.

    The stream id is the time of writing, as the gateway's XADD makes it.
    """
    old = dead_letter(now - 7200, "w1").model_copy(update={"error": "old failure"})
    client.xadd(keys.dead_letters, {FIELD: dump(old)}, id=f"{int(old.ts * 1000)}-0")
    for worker in ("w1", "w2"):
        client.xadd(keys.dead_letters, {FIELD: dump(dead_letter(now, worker))})
    client.set(keys.dead_letter_count, 7)


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
    records.add_requests(_requests(now))
