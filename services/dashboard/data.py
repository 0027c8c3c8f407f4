"""Pure data shaping for the dashboard: record rows in, pandas frames and summaries out.

Nothing here touches Streamlit or the database, so every function is tested on
synthetic rows. Row dicts carry the field names of the models in ``shared/schemas.py``
(``ts`` is epoch seconds); every frame built here gains a ``time`` column (UTC
datetimes) for the charts. Missing columns or empty inputs give empty frames, never
errors: a dashboard over a half-filled database must still draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from shared.schemas import WorkerInfo

# Time windows offered in the sidebar: label -> seconds (None = everything recorded).
WINDOWS: dict[str, float | None] = {
    "5 min": 300.0,
    "15 min": 900.0,
    "1 h": 3600.0,
    "6 h": 21600.0,
    "24 h": 86400.0,
    "all": None,
}
# Memory pressure thresholds of the agent's seed rules (grow below, shrink above).
MEMORY_THRESHOLDS: dict[str, float] = {"60%": 0.60, "85%": 0.85}
GIB = float(1 << 30)
# Settings fields shown in a decision's "before -> after", with their short names.
_CHANGE_FIELDS = (("batch_size", "batch"), ("max_seq_len", "max seq"), ("precision", "precision"))


def window_label(minutes: float) -> str:
    """The sidebar label for a default window in minutes; "15 min" when none matches."""
    for label, seconds in WINDOWS.items():
        if seconds is not None and math.isclose(seconds, minutes * 60.0):
            return label
    return "15 min"


def window_since(label: str, now: float) -> float | None:
    """Start (epoch s) of the window called ``label`` ending at ``now``; None = no bound.

    Raises ``KeyError`` for a label not in :data:`WINDOWS`.
    """
    seconds = WINDOWS[label]
    return None if seconds is None else now - seconds


def to_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = ()) -> pd.DataFrame:
    """Rows as a frame sorted by ``ts``, with every name in ``columns`` present and a ``time``."""
    frame = pd.DataFrame(list(rows))
    for column in ("ts", *columns):
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    frame["ts"] = pd.to_numeric(frame["ts"], errors="coerce")
    frame = frame.dropna(subset=["ts"]).sort_values("ts", kind="stable").reset_index(drop=True)
    frame["time"] = pd.to_datetime(frame["ts"], unit="s", utc=True)
    return frame


@dataclass(frozen=True)
class Filters:
    """Which workers and GPU indices to show; an empty tuple means all of them."""

    workers: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()


def apply_filters(frame: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """Rows of ``frame`` matching ``filters`` on whichever of worker_id/gpu_index it has."""
    mask = pd.Series(True, index=frame.index)
    if filters.workers and "worker_id" in frame.columns:
        mask &= frame["worker_id"].isin(filters.workers)
    if filters.gpus and "gpu_index" in frame.columns:
        mask &= frame["gpu_index"].isin(filters.gpus)
    return frame[mask].reset_index(drop=True)


def thin(frame: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """Every k-th row so that at most ``max_rows`` remain (keeps charts light), last row kept."""
    if len(frame) <= max_rows:
        return frame
    step = math.ceil(len(frame) / max_rows)
    keep = list(range(0, len(frame), step))
    if keep[-1] != len(frame) - 1:
        keep[-1] = len(frame) - 1
    return frame.iloc[keep].reset_index(drop=True)


def worker_options(workers: Iterable[WorkerInfo], cycles: pd.DataFrame) -> list[str]:
    """Every worker id known from the workers table or seen in cycles, sorted."""
    ids = {w.worker_id for w in workers}
    if "worker_id" in cycles.columns:
        ids.update(str(v) for v in cycles["worker_id"].dropna())
    return sorted(ids)


def gpu_options(workers: Iterable[WorkerInfo], telemetry: pd.DataFrame) -> list[int]:
    """Every GPU index known from workers or telemetry, sorted (CPU-only rows excluded)."""
    indices = {w.gpu_index for w in workers if w.gpu_index is not None}
    if "gpu_index" in telemetry.columns:
        indices.update(int(v) for v in telemetry["gpu_index"].dropna())
    return sorted(indices)


@dataclass(frozen=True)
class Headline:
    """The numbers at the top of the page, over the filtered window.

    ``tokens_per_s`` sums each worker's latest cycle (total throughput now); batch
    size (with the engine core: the most sequences running at once in the cycle's
    window), precision and settings version list the distinct values of the workers'
    latest cycles, joined by "/" (one value when they agree; ``per_worker`` says
    which is whose); ``queue_depth`` is the most recent reading of any worker.
    """

    tokens_per_s: float | None
    batch_size: str
    precision: str
    settings_version: str
    oom_count: int
    queue_depth: int | None
    last_cycle_ts: float | None
    per_worker: str = ""


def _distinct(values: Iterable[Any]) -> str:
    """Distinct values in order of first appearance, joined for display ("-" if none)."""
    seen: list[str] = []
    for value in values:
        text = str(value)
        if text not in seen:
            seen.append(text)
    return "/".join(seen) if seen else "-"


def headline(cycles: pd.DataFrame, ooms: pd.DataFrame) -> Headline:
    """Summarise the cycles and OOM events of a window (frames from :func:`to_frame`)."""
    cycles = cycles.dropna(subset=["worker_id"]) if "worker_id" in cycles else cycles
    if cycles.empty:
        return Headline(None, "-", "-", "-", len(ooms), None, None)
    latest = cycles.groupby("worker_id", sort=True).tail(1).sort_values("worker_id")
    last = cycles.iloc[-1]
    return Headline(
        tokens_per_s=float(pd.to_numeric(latest["tokens_per_s"], errors="coerce").sum()),
        batch_size=_distinct(latest["batch_size"]),
        precision=_distinct(latest["precision"]),
        settings_version=_distinct(latest["settings_version"]),
        oom_count=len(ooms),
        queue_depth=None if pd.isna(last["queue_depth"]) else int(last["queue_depth"]),
        last_cycle_ts=float(last["ts"]),
        per_worker="; ".join(
            f"{r.worker_id}: max running {r.batch_size}, {r.precision}, v{r.settings_version}"
            for r in latest.itertuples()
        ),
    )


def _setting(settings: Any, flat: Mapping[str, Any], name: str, side: str) -> Any:
    """A settings field from a decoded before/after dict, else the flat ``name_side`` column."""
    if isinstance(settings, Mapping) and settings.get(name) is not None:
        return settings[name]
    value = flat.get(f"{name}_{side}")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def describe_change(row: Mapping[str, Any]) -> str:
    """A decision row's settings change, e.g. ``batch 16->8, precision bf16->fp16``."""
    parts = []
    for name, short in _CHANGE_FIELDS:
        before = _setting(row.get("before"), row, name, "before")
        after = _setting(row.get("after"), row, name, "after")
        if after is not None and before != after:
            parts.append(f"{short} {'?' if before is None else before}->{after}")
    return ", ".join(parts) if parts else "no change"


def _clock(frame: pd.DataFrame) -> pd.Series:
    """Local-agnostic wall-clock text (UTC) of each row, for tables."""
    return frame["time"].dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def decisions_table(decisions: pd.DataFrame) -> pd.DataFrame:
    """Decisions newest first: time, worker, action, change (before->after), reason."""
    columns = ["time", "worker", "action", "change", "reason"]
    if decisions.empty:
        return pd.DataFrame(columns=columns)
    newest = decisions.iloc[::-1].reset_index(drop=True)
    return pd.DataFrame(
        {
            "time": _clock(newest),
            "worker": newest["worker_id"].astype(str),
            "action": newest["action"].map(_action_text),
            "change": [describe_change(row) for row in newest.to_dict("records")],
            "reason": newest["reason"].fillna("").astype(str),
        },
        columns=columns,
    )


def _action_text(action: Any) -> str:
    """``grow`` for both the stored string and a DecisionAction enum member."""
    return str(getattr(action, "value", action))


def oom_table(ooms: pd.DataFrame) -> pd.DataFrame:
    """OOM events newest first, with the batch that failed and what the guard did."""
    names = {
        "worker_id": "worker",
        "gpu_index": "gpu",
        "batch_size": "batch size",
        "max_prompt_len": "max prompt len",
        "max_new_tokens": "max new tokens",
        "precision": "precision",
        "recovered": "recovered",
        "action": "action",
        "message": "message",
    }
    if ooms.empty:
        return pd.DataFrame(columns=["time", *names.values()])
    newest = ooms.iloc[::-1].reset_index(drop=True)
    table = newest.reindex(columns=list(names)).rename(columns=names)
    table.insert(0, "time", _clock(newest))
    return table


def cycle_series(cycles: pd.DataFrame, column: str) -> pd.DataFrame:
    """One numeric cycle column as ``time, worker_id, value`` (rows without a value dropped)."""
    if column not in cycles.columns or cycles.empty:
        return pd.DataFrame(columns=["time", "worker_id", "value"])
    frame = cycles[["time", "worker_id"]].copy()
    frame["value"] = pd.to_numeric(cycles[column], errors="coerce")
    return frame.dropna(subset=["value"]).reset_index(drop=True)


def latency_series(cycles: pd.DataFrame) -> pd.DataFrame:
    """Latency quantiles as ``time, worker_id, quantile, seconds`` (p50 and p95).

    Cycles that report no quantiles fall back to their batch latency, labelled "batch".
    """
    parts = []
    for column, label in (("latency_p50_s", "p50"), ("latency_p95_s", "p95")):
        part = cycle_series(cycles, column).assign(quantile=label)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if any(len(p) for p in parts) else None
    if frame is None:
        frame = cycle_series(cycles, "latency_s").assign(quantile="batch")
    frame = frame.rename(columns={"value": "seconds"})
    return frame.reindex(columns=["time", "worker_id", "quantile", "seconds"])


def device_label(host: Any, gpu_index: Any) -> str:
    """How a GPU is named on charts: ``host GPU 0`` (or ``host CPU`` without a GPU)."""
    if gpu_index is None or (isinstance(gpu_index, float) and math.isnan(gpu_index)):
        return f"{host} CPU"
    return f"{host} GPU {int(gpu_index)}"


def _devices(telemetry: pd.DataFrame) -> list[str]:
    """The :func:`device_label` of each telemetry row."""
    pairs = zip(telemetry["host"], telemetry["gpu_index"], strict=True)
    return [device_label(host, index) for host, index in pairs]


def _long_memory(frame: pd.DataFrame, used: str, total: str) -> pd.DataFrame:
    """``time, device`` rows with ``used``/``total`` byte columns as a long GiB frame."""
    parts = []
    for column, series in ((used, "used"), (total, "total")):
        part = frame[["time", "device"]].assign(series=series)
        part["gib"] = pd.to_numeric(frame[column], errors="coerce") / GIB
        parts.append(part)
    return pd.concat(parts, ignore_index=True).dropna(subset=["gib"]).reset_index(drop=True)


@dataclass(frozen=True)
class MemorySeries:
    """Memory used and total per device (``time, device, series, gib``) and where from.

    ``source`` is "gpu" (monitor telemetry), "worker" (NVML readings in cycle stats),
    "host" (no GPU: host RAM) or "" when there is nothing to draw.
    """

    frame: pd.DataFrame
    source: str


def memory_series(telemetry: pd.DataFrame, cycles: pd.DataFrame) -> MemorySeries:
    """GPU memory from telemetry, else from the workers' cycles, else host memory."""
    gpu = telemetry.dropna(subset=["gpu_index", "memory_total_bytes"])
    if not gpu.empty:
        gpu = gpu.assign(device=_devices(gpu))
        return MemorySeries(_long_memory(gpu, "memory_used_bytes", "memory_total_bytes"), "gpu")
    if "nvml_total_bytes" in cycles.columns:
        nvml = cycles.dropna(subset=["nvml_total_bytes"])
        if not nvml.empty:
            nvml = nvml.assign(device="worker " + nvml["worker_id"].astype(str))
            return MemorySeries(_long_memory(nvml, "nvml_used_bytes", "nvml_total_bytes"), "worker")
    host = telemetry.dropna(subset=["host_memory_total_bytes"])
    host = host[pd.to_numeric(host["host_memory_total_bytes"], errors="coerce") > 0]
    if not host.empty:
        host = host.drop_duplicates(subset=["ts", "host"]).assign(device=host["host"] + " host")
        frame = _long_memory(host, "host_memory_used_bytes", "host_memory_total_bytes")
        return MemorySeries(frame, "host")
    return MemorySeries(pd.DataFrame(columns=["time", "device", "series", "gib"]), "")


def threshold_levels(memory: pd.DataFrame) -> pd.DataFrame:
    """The 60% and 85% lines (``level, gib``) of each distinct latest device total."""
    totals = memory[memory["series"] == "total"]
    if totals.empty:
        return pd.DataFrame(columns=["level", "gib"])
    latest = totals.groupby("device").tail(1)["gib"].round(3).unique()
    rows = [
        {"level": label, "gib": float(total) * share}
        for total in sorted(latest)
        for label, share in MEMORY_THRESHOLDS.items()
    ]
    return pd.DataFrame(rows, columns=["level", "gib"])


def utilisation_series(telemetry: pd.DataFrame, cycles: pd.DataFrame) -> pd.DataFrame:
    """GPU utilisation % as ``time, device, pct``: telemetry first, else the cycles' reading."""
    gpu = telemetry.dropna(subset=["gpu_index", "utilization_pct"])
    if not gpu.empty:
        devices = _devices(gpu)
        frame = pd.DataFrame({"time": gpu["time"], "device": devices})
        frame["pct"] = pd.to_numeric(gpu["utilization_pct"], errors="coerce")
        return frame.dropna(subset=["pct"]).reset_index(drop=True)
    series = cycle_series(cycles, "gpu_utilization_pct")
    return pd.DataFrame(
        {
            "time": series["time"],
            "device": "worker " + series["worker_id"].astype(str),
            "pct": series["value"],
        },
        columns=["time", "device", "pct"],
    )


def decision_marks(decisions: pd.DataFrame) -> pd.DataFrame:
    """Decisions as timeline marks: ``time, worker_id, action, change, reason``."""
    columns = ["time", "worker_id", "action", "change", "reason"]
    if decisions.empty:
        return pd.DataFrame(columns=columns)
    frame = decisions[["time", "worker_id"]].copy()
    frame["action"] = decisions["action"].map(_action_text)
    frame["change"] = [describe_change(row) for row in decisions.to_dict("records")]
    frame["reason"] = decisions["reason"].fillna("").astype(str)
    return frame.reset_index(drop=True)


def oom_marks(ooms: pd.DataFrame) -> pd.DataFrame:
    """OOM events as timeline marks: ``time, worker_id, batch_size, action, message``."""
    columns = ["time", "worker_id", "batch_size", "action", "message"]
    if ooms.empty:
        return pd.DataFrame(columns=columns)
    return ooms.reindex(columns=columns).reset_index(drop=True)


def banners(workers: Sequence[WorkerInfo], telemetry: pd.DataFrame) -> list[str]:
    """Warnings for the top of the page: synthetic models, and hosts or workers without a GPU."""
    messages = []
    synthetic = [w for w in workers if w.synthetic]
    if synthetic:
        names = ", ".join(f"{w.worker_id} ({w.model})" for w in synthetic)
        messages.append(f"Synthetic model on {names}: random weights: text is meaningless.")
    # A real model serving in place of the configured one names itself "... (fallback for X)".
    fallback = [w for w in workers if not w.synthetic and "(fallback for " in w.model]
    if fallback:
        names = ", ".join(f"{w.worker_id} ({w.model})" for w in fallback)
        messages.append(f"Fallback model on {names}: the configured model could not be loaded.")
    cpu_workers = [w.worker_id for w in workers if w.device.startswith("cpu")]
    gpu_hosts = set(telemetry.dropna(subset=["gpu_index"])["host"]) if len(telemetry) else set()
    cpu_hosts = sorted(set(telemetry["host"].dropna()) - gpu_hosts) if len(telemetry) else []
    if cpu_workers or cpu_hosts:
        where = [f"worker {w}" for w in cpu_workers] + [f"host {h}" for h in cpu_hosts]
        messages.append(f"No GPU present ({', '.join(where)}): running on CPU.")
    return messages
