"""The dashboard's pure data functions on synthetic record rows."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from services.dashboard import data
from services.dashboard.data import Filters
from shared.schemas import WorkerInfo

T0 = 1_700_000_000.0
GIB = 1 << 30


def cycle(ts: float, worker: str, **overrides: Any) -> dict[str, Any]:
    row = {
        "ts": ts,
        "worker_id": worker,
        "gpu_index": 0,
        "settings_version": 1,
        "batch_size": 16,
        "precision": "bf16",
        "tokens_per_s": 100.0,
        "latency_s": 1.0,
        "latency_p50_s": 0.5,
        "latency_p95_s": 0.9,
        "queue_depth": 3,
        "gpu_utilization_pct": 50.0,
        "nvml_used_bytes": None,
        "nvml_total_bytes": None,
    }
    row.update(overrides)
    return row


def settings(batch: int, precision: str = "bf16", seq: int = 2048, version: int = 1) -> dict:
    return {"batch_size": batch, "precision": precision, "max_seq_len": seq, "version": version}


def decision(ts: float, worker: str, action: str, reason: str, before: dict, after: dict) -> dict:
    return {
        "ts": ts,
        "worker_id": worker,
        "action": action,
        "reason": reason,
        "before": before,
        "after": after,
    }


def telemetry(ts: float, host: str, gpu: int | None, used: int, total: int, util: float) -> dict:
    return {
        "ts": ts,
        "host": host,
        "gpu_index": gpu,
        "memory_used_bytes": None if gpu is None else used,
        "memory_total_bytes": None if gpu is None else total,
        "utilization_pct": None if gpu is None else util,
        "host_memory_used_bytes": 4 * GIB,
        "host_memory_total_bytes": 16 * GIB,
    }


def worker(worker_id: str, synthetic: bool, device: str = "cuda:0", gpu: int | None = 0):
    return WorkerInfo(
        worker_id=worker_id,
        host="h1",
        pid=1,
        device=device,
        gpu_index=gpu,
        model="synthetic:tiny" if synthetic else "TinyLlama",
        synthetic=synthetic,
    )


def test_window_since_and_labels() -> None:
    assert data.window_since("5 min", T0) == T0 - 300
    assert data.window_since("24 h", T0) == T0 - 86400
    assert data.window_since("all", T0) is None
    assert data.window_label(60) == "1 h"
    assert data.window_label(7) == "15 min"
    with pytest.raises(KeyError):
        data.window_since("2 weeks", T0)


def test_to_frame_sorts_adds_time_and_missing_columns() -> None:
    frame = data.to_frame([{"ts": T0 + 5, "a": 1}, {"ts": T0, "a": 2}], ["b"])
    assert list(frame["a"]) == [2, 1]
    assert frame["b"].isna().all()
    assert frame["time"].iloc[0] == pd.Timestamp(T0, unit="s", tz="UTC")
    empty = data.to_frame([], ["worker_id"])
    assert empty.empty and {"ts", "time", "worker_id"} <= set(empty.columns)


def test_apply_filters_by_worker_and_gpu() -> None:
    frame = data.to_frame(
        [cycle(T0, "w1", gpu_index=0), cycle(T0 + 1, "w2", gpu_index=1), cycle(T0 + 2, "w1")]
    )
    assert len(data.apply_filters(frame, Filters())) == 3
    assert list(data.apply_filters(frame, Filters(workers=("w2",)))["worker_id"]) == ["w2"]
    assert list(data.apply_filters(frame, Filters(gpus=(0,)))["ts"]) == [T0, T0 + 2]
    assert data.apply_filters(frame, Filters(workers=("w2",), gpus=(0,))).empty


def test_thin_keeps_bound_and_last_row() -> None:
    frame = pd.DataFrame({"ts": range(1000)})
    thinned = data.thin(frame, 100)
    assert len(thinned) <= 100
    assert thinned["ts"].iloc[0] == 0 and thinned["ts"].iloc[-1] == 999
    assert data.thin(frame.head(5), 100).equals(frame.head(5))


def test_headline_sums_latest_throughput_and_lists_settings() -> None:
    cycles = data.to_frame(
        [
            cycle(T0, "w1", tokens_per_s=50.0, batch_size=8),
            cycle(T0 + 1, "w2", tokens_per_s=70.0, batch_size=4, precision="fp16"),
            cycle(
                T0 + 2, "w1", tokens_per_s=120.0, batch_size=16, settings_version=2, queue_depth=7
            ),
        ]
    )
    ooms = data.to_frame([{"ts": T0 + 1, "worker_id": "w1"}])
    head = data.headline(cycles, ooms)
    assert head.tokens_per_s == pytest.approx(190.0)
    assert head.batch_size == "16/4"
    assert head.precision == "bf16/fp16"
    assert head.settings_version == "2/1"
    assert head.per_worker == "w1: max running 16, bf16, v2; w2: max running 4, fp16, v1"
    assert head.queue_depth == 7
    assert head.oom_count == 1
    assert head.last_cycle_ts == T0 + 2


def test_headline_of_one_worker_and_of_nothing() -> None:
    one = data.headline(data.to_frame([cycle(T0, "w1", batch_size=32)]), data.to_frame([]))
    assert (one.batch_size, one.precision, one.oom_count) == ("32", "bf16", 0)
    empty = data.headline(data.to_frame([], ["worker_id"]), data.to_frame([]))
    assert empty.tokens_per_s is None and empty.batch_size == "-" and empty.queue_depth is None


def test_describe_change_uses_json_then_flat_columns() -> None:
    row = {"before": settings(16), "after": settings(8, "fp16")}
    assert data.describe_change(row) == "batch 16->8, precision bf16->fp16"
    flat = {
        "before": None,
        "after": None,
        "batch_size_before": 4,
        "batch_size_after": 8,
        "precision_after": "bf16",
    }
    assert data.describe_change(flat) == "batch 4->8, precision ?->bf16"
    same = {"before": settings(8), "after": settings(8)}
    assert data.describe_change(same) == "no change"


def test_decisions_table_newest_first_with_reasons() -> None:
    rows = [
        decision(T0, "w1", "grow", "memory 40% < 60%", settings(8), settings(16)),
        decision(T0 + 60, "w1", "halve", "OOM at batch 16", settings(16), settings(8)),
    ]
    table = data.decisions_table(data.to_frame(rows))
    assert list(table.columns) == ["time", "worker", "action", "change", "reason"]
    assert list(table["action"]) == ["halve", "grow"]
    assert list(table["reason"]) == ["OOM at batch 16", "memory 40% < 60%"]
    assert list(table["change"]) == ["batch 16->8", "batch 8->16"]
    assert table["time"].iloc[1] == "2023-11-14 22:13:20 UTC"
    assert data.decisions_table(data.to_frame([])).empty


def test_oom_table_columns_and_order() -> None:
    rows = [
        {"ts": T0, "worker_id": "w1", "batch_size": 32, "action": "split", "recovered": True},
        {"ts": T0 + 9, "worker_id": "w1", "batch_size": 16, "action": "split", "recovered": False},
    ]
    table = data.oom_table(data.to_frame(rows))
    assert list(table["batch size"]) == [16, 32]
    assert list(table["recovered"]) == [False, True]
    assert {"time", "worker", "gpu", "message"} <= set(table.columns)


def test_latency_series_quantiles_and_fallback() -> None:
    frame = data.latency_series(data.to_frame([cycle(T0, "w1"), cycle(T0 + 1, "w1")]))
    assert sorted(frame["quantile"].unique()) == ["p50", "p95"]
    assert frame[frame["quantile"] == "p95"]["seconds"].tolist() == [0.9, 0.9]
    bare = data.to_frame([cycle(T0, "w1", latency_p50_s=None, latency_p95_s=None)])
    fallback = data.latency_series(bare)
    assert fallback["quantile"].tolist() == ["batch"] and fallback["seconds"].tolist() == [1.0]


def test_memory_series_prefers_gpu_telemetry_and_thresholds() -> None:
    tel = data.to_frame(
        [
            telemetry(T0, "h1", 0, 30 * GIB, 80 * GIB, 90),
            telemetry(T0, "h1", 1, 10 * GIB, 80 * GIB, 5),
        ]
    )
    memory = data.memory_series(tel, data.to_frame([cycle(T0, "w1")]))
    assert memory.source == "gpu"
    used = memory.frame[memory.frame["series"] == "used"]
    assert dict(zip(used["device"], used["gib"], strict=True)) == {
        "h1 GPU 0": 30.0,
        "h1 GPU 1": 10.0,
    }
    levels = data.threshold_levels(memory.frame)
    assert dict(zip(levels["level"], levels["gib"], strict=True)) == {"60%": 48.0, "85%": 68.0}


def test_memory_series_falls_back_to_cycles_then_host() -> None:
    cycles = data.to_frame([cycle(T0, "w1", nvml_used_bytes=2 * GIB, nvml_total_bytes=8 * GIB)])
    from_cycles = data.memory_series(
        data.to_frame([], list(telemetry(0, "h", None, 0, 0, 0))), cycles
    )
    assert from_cycles.source == "worker"
    assert set(from_cycles.frame["gib"]) == {2.0, 8.0}
    cpu_tel = data.to_frame([telemetry(T0, "h1", None, 0, 0, 0)])
    host = data.memory_series(cpu_tel, data.to_frame([cycle(T0, "w1")]))
    assert host.source == "host"
    assert set(zip(host.frame["series"], host.frame["gib"], strict=True)) == {
        ("used", 4.0),
        ("total", 16.0),
    }
    nothing = data.memory_series(data.to_frame([], list(cpu_tel.columns)), data.to_frame([]))
    assert nothing.source == "" and nothing.frame.empty


def test_utilisation_from_telemetry_else_cycles() -> None:
    tel = data.to_frame([telemetry(T0, "h1", 0, 1, 2, 75.0)])
    util = data.utilisation_series(tel, data.to_frame([cycle(T0, "w1")]))
    assert util["device"].tolist() == ["h1 GPU 0"] and util["pct"].tolist() == [75.0]
    cpu_tel = data.to_frame([telemetry(T0, "h1", None, 0, 0, 0)])
    util = data.utilisation_series(
        cpu_tel, data.to_frame([cycle(T0, "w1", gpu_utilization_pct=20.0)])
    )
    assert util["device"].tolist() == ["worker w1"] and util["pct"].tolist() == [20.0]


def test_marks_carry_reason_and_oom_details() -> None:
    decisions = data.to_frame(
        [decision(T0, "w1", "shrink", "memory 90% > 85%", settings(16), settings(12))]
    )
    marks = data.decision_marks(decisions)
    assert marks[["action", "change", "reason"]].values.tolist() == [
        ["shrink", "batch 16->12", "memory 90% > 85%"]
    ]
    ooms = data.oom_marks(
        data.to_frame(
            [
                {
                    "ts": T0,
                    "worker_id": "w1",
                    "batch_size": 64,
                    "action": "split",
                    "message": "CUDA OOM",
                }
            ]
        )
    )
    assert ooms[["batch_size", "message"]].values.tolist() == [[64, "CUDA OOM"]]
    assert data.oom_marks(data.to_frame([])).empty


def test_banners_for_synthetic_models_and_missing_gpu() -> None:
    gpu_tel = data.to_frame([telemetry(T0, "h1", 0, 1, 2, 3)])
    assert data.banners([worker("w1", synthetic=False)], gpu_tel) == []
    messages = data.banners([worker("w1", synthetic=True), worker("w2", False)], gpu_tel)
    assert len(messages) == 1
    assert (
        "w1 (synthetic:tiny)" in messages[0]
        and "random weights: text is meaningless" in messages[0]
    )
    cpu_tel = data.to_frame([telemetry(T0, "h2", None, 0, 0, 0)])
    messages = data.banners([worker("w3", False, device="cpu", gpu=None)], cpu_tel)
    assert messages == ["No GPU present (worker w3, host h2): running on CPU."]


def test_banner_for_a_real_fallback_model() -> None:
    gpu_tel = data.to_frame([telemetry(T0, "h1", 0, 1, 2, 3)])
    fallback = worker("w1", synthetic=False).model_copy(
        update={"model": "smollm2-135m (fallback for TinyLlama/TinyLlama-1.1B-Chat-v1.0)"}
    )
    assert data.banners([fallback, worker("w2", False)], gpu_tel) == [
        "Fallback model on w1 (smollm2-135m (fallback for TinyLlama/TinyLlama-1.1B-Chat-v1.0)): "
        "the configured model could not be loaded."
    ]


def test_options_union_workers_and_rows() -> None:
    cycles = data.to_frame([cycle(T0, "w9")])
    tel = data.to_frame([telemetry(T0, "h1", 3, 1, 2, 3), telemetry(T0, "h1", None, 0, 0, 0)])
    assert data.worker_options([worker("w1", False)], cycles) == ["w1", "w9"]
    assert data.gpu_options([worker("w1", False, gpu=1)], tel) == [1, 3]
