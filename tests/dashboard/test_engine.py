"""The engine core's headline numbers and series, on synthetic cycle rows."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from services.dashboard import engine
from services.dashboard.data import to_frame
from shared.db import TABLES

T0 = 1_700_000_000.0
GIB = 1 << 30
CYCLE_COLUMNS = TABLES["cycles"].column_names


def core(ts: float, worker: str, **overrides: Any) -> dict[str, Any]:
    row = {
        "ts": ts,
        "worker_id": worker,
        "running": 4,
        "waiting": 1,
        "kv_blocks_used": 100,
        "kv_blocks_total": 400,
        "kv_usage": 0.25,
        "kv_pool_bytes": GIB,
        "preemptions": 0,
        "prefill_tokens": 10,
        "decode_tokens": 20,
        "ttft_p50_s": 0.05,
        "ttft_p95_s": 0.08,
        "itl_p50_s": 0.01,
        "itl_p95_s": 0.02,
    }
    row.update(overrides)
    return row


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return to_frame(rows, CYCLE_COLUMNS)


def test_headline_sums_queues_and_takes_the_fullest_cache() -> None:
    cycles = frame(
        core(T0, "w1", running=9, preemptions=2, ttft_p95_s=2.5),
        core(T0 + 1, "w2", running=3, waiting=0, kv_blocks_used=300, kv_usage=0.75),
        core(T0 + 2, "w1", running=5, waiting=2, preemptions=1, ttft_p95_s=None),
    )
    head = engine.engine_headline(cycles)
    assert head.running_waiting == "8 / 2"  # w1's latest 5 / 2 + w2's 3 / 0
    assert head.kv_usage == "75.0%"
    assert head.kv_detail == (
        "w1: 25.0% (100/400 blocks, pool 1.00 GiB); w2: 75.0% (300/400 blocks, pool 1.00 GiB)"
    )
    # w1's latest window saw no first token: its previous p95 (2.5 s) still counts.
    assert head.ttft_p95 == "2.50 s"
    assert head.preemptions == "3"


def test_headline_of_an_older_database_is_dashes() -> None:
    old = to_frame([{"ts": T0, "worker_id": "w1", "tokens_per_s": 5.0}], CYCLE_COLUMNS)
    head = engine.engine_headline(old)
    assert (head.running_waiting, head.kv_usage, head.ttft_p95, head.preemptions) == (
        "-",
        "-",
        "-",
        "-",
    )
    assert head.kv_detail == ""
    assert engine.engine_headline(frame()).kv_usage == "-"


def test_kv_series_skips_engines_without_a_pool() -> None:
    cycles = frame(
        core(T0, "w1", kv_blocks_used=50, kv_usage=0.125),
        core(T0, "hf", kv_blocks_used=0, kv_blocks_total=0, kv_usage=0.0, kv_pool_bytes=0),
    )
    kv = engine.kv_series(cycles)
    assert kv[["worker_id", "pct", "blocks_used", "blocks_total", "pool_gib"]].values.tolist() == [
        ["w1", 12.5, 50.0, 400.0, 1.0]
    ]
    assert engine.kv_pools(kv) == "w1: 400 blocks, 1.00 GiB"
    assert engine.kv_pools(engine.kv_series(frame())) == ""


def test_paired_series_is_long_and_keeps_order() -> None:
    cycles = frame(core(T0, "w1"), core(T0 + 1, "w1", prefill_tokens=None))
    pair = engine.paired_series(cycles, {"decode_tokens": "decode", "prefill_tokens": "prefill"})
    assert pair[["series", "value"]].values.tolist() == [
        ["decode", 20.0],
        ["decode", 20.0],
        ["prefill", 10.0],
    ]
    assert engine.paired_series(frame(), {"running": "running"}).empty


def test_request_outcomes_count_cancelled_and_errors() -> None:
    reasons = ["stop", "cancelled", "length", "error", "cancelled"]
    requests = to_frame([{"ts": T0 + i, "finish_reason": r} for i, r in enumerate(reasons)])
    outcomes = engine.request_outcomes(requests)
    assert (outcomes.finished, outcomes.cancelled, outcomes.errors) == (5, 2, 1)
    assert outcomes.detail().startswith("5 requests finished in this window: 2 completed, 2 ")
    assert engine.request_outcomes(to_frame([])) == engine.RequestOutcomes(0, 0, 0)


def test_percent_text_keeps_small_usage_visible() -> None:
    assert [engine.percent_text(p) for p in (0.0, 0.034, 62.5, 100.0)] == [
        "0.0%",
        "0.03%",
        "62.5%",
        "100.0%",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (float("nan"), "-"), (0.0854, "85 ms"), (1.254, "1.25 s")]
)
def test_seconds_text(seconds: float | None, text: str) -> None:
    assert engine.seconds_text(seconds) == text


def test_worker_memory_in_gib_and_cpu_without_reservation() -> None:
    cycles = frame(
        core(T0, "gpu", memory_peak_bytes=3 * GIB, memory_reserved_bytes=8 * GIB),
        core(T0, "cpu", memory_peak_bytes=GIB // 2, memory_reserved_bytes=None),
    )
    memory = engine.worker_memory_series(cycles)
    rows = memory[["worker_id", "series", "gib"]].values.tolist()
    assert sorted(rows) == [["cpu", "held", 0.5], ["gpu", "held", 3.0], ["gpu", "reserved", 8.0]]
    assert engine.worker_memory_series(frame()).empty


def test_pool_beside_other_processes_memory() -> None:
    cycles = frame(
        core(T0, "gpu", kv_pool_bytes=8 * GIB, nvml_used_bytes=50 * GIB,
             memory_reserved_bytes=12 * GIB),
        core(T0 + 1, "gpu", kv_pool_bytes=4 * GIB, nvml_used_bytes=50 * GIB,
             memory_reserved_bytes=8 * GIB),
        core(T0, "cpu", kv_pool_bytes=GIB // 4, nvml_used_bytes=None, memory_reserved_bytes=None),
    )  # fmt: skip
    rows = engine.pool_and_tenants(cycles)[["worker_id", "series", "gib"]].values.tolist()
    assert sorted(rows) == sorted([
        ["gpu", "KV pool", 8.0], ["gpu", "other processes", 38.0],
        ["gpu", "KV pool", 4.0], ["gpu", "other processes", 42.0],
        ["cpu", "KV pool", 0.25],
    ])  # fmt: skip
    assert engine.pool_and_tenants(frame()).empty
