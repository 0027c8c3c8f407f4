"""The engine core's figures for the dashboard: its headline numbers and its time series.

Each cycle record of a continuous-batching worker covers a window of engine steps
(about a second): how many sequences ran and waited at its end, KV blocks in use,
preemptions, prefill and decode tokens, and time-to-first-token and inter-token
latency quantiles. Databases written by an older version lack these columns (their
frames carry them as all-missing, see :func:`services.dashboard.data.to_frame`): every
function here then gives "-" or an empty frame, never an error. Pure: frames in, frames
and text out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from services.dashboard.data import GIB, cycle_series

# Finish reasons counted in the request outcomes (shared.schemas.FinishReason).
CANCELLED = "cancelled"
ERROR = "error"


def _number(value: Any) -> float | None:
    """A cell as a float; None for NULL / NaN / text that is not a number."""
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return None if pd.isna(number) else float(number)


def seconds_text(seconds: float | None) -> str:
    """A latency for display: ``85 ms`` below a second, ``1.25 s`` above, ``-`` if unknown."""
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def percent_text(pct: float) -> str:
    """A percentage for display; two decimals below 1 % so that a large pool isn't "0.0%"."""
    return f"{pct:.2f}%" if 0 < pct < 1 else f"{pct:.1f}%"


def _latest_known(cycles: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per worker, its latest cycle that has a value in ``column`` (``worker_id, value``)."""
    series = cycle_series(cycles, column)
    return series.groupby("worker_id", sort=True).tail(1).sort_values("worker_id")


@dataclass(frozen=True)
class EngineHeadline:
    """Engine-core numbers at the top of the page; text ready to show ("-" when unknown).

    ``running``/``waiting``: summed over the workers' latest cycles. ``kv_usage``: the
    highest of the workers' latest KV usage (the one nearest to preempting), with every
    worker's blocks and pool in ``kv_detail``. ``ttft_p95``: the highest latest p95.
    ``preemptions``: summed over every cycle of the window.
    """

    running_waiting: str
    kv_usage: str
    kv_detail: str
    ttft_p95: str
    preemptions: str


def engine_headline(cycles: pd.DataFrame) -> EngineHeadline:
    """The :class:`EngineHeadline` of a window's cycles (frame from ``to_frame``)."""
    cycles = cycles.dropna(subset=["worker_id"]) if "worker_id" in cycles else cycles
    running, waiting = _latest_known(cycles, "running"), _latest_known(cycles, "waiting")
    queues = "-"
    if not running.empty and not waiting.empty:
        queues = f"{running['value'].sum():.0f} / {waiting['value'].sum():.0f}"
    kv = kv_series(cycles).groupby("worker_id", sort=True).tail(1)
    ttft = _latest_known(cycles, "ttft_p95_s")["value"]
    preempted = cycle_series(cycles, "preemptions")["value"]
    return EngineHeadline(
        running_waiting=queues,
        kv_usage="-" if kv.empty else percent_text(float(kv["pct"].max())),
        kv_detail="; ".join(
            f"{r.worker_id}: {percent_text(r.pct)} "
            f"({r.blocks_used:.0f}/{r.blocks_total:.0f} blocks, pool {r.pool_gib:.2f} GiB)"
            for r in kv.sort_values("worker_id").itertuples()
        ),
        ttft_p95=seconds_text(None if ttft.empty else float(ttft.max())),
        preemptions="-" if preempted.empty else f"{preempted.sum():.0f}",
    )


def kv_series(cycles: pd.DataFrame) -> pd.DataFrame:
    """KV cache usage as ``time, worker_id, pct, blocks_used, blocks_total, pool_gib``.

    Only cycles of a paged pool count (``kv_blocks_total > 0``): the HF fallback engine
    records zeros, which would read as an empty cache.
    """
    columns = ["time", "worker_id", "pct", "blocks_used", "blocks_total", "pool_gib"]
    needed = ("kv_usage", "kv_blocks_used", "kv_blocks_total", "kv_pool_bytes")
    if cycles.empty or any(c not in cycles.columns for c in needed):
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(
        {
            "time": cycles["time"],
            "worker_id": cycles["worker_id"],
            "pct": pd.to_numeric(cycles["kv_usage"], errors="coerce") * 100.0,
            "blocks_used": pd.to_numeric(cycles["kv_blocks_used"], errors="coerce"),
            "blocks_total": pd.to_numeric(cycles["kv_blocks_total"], errors="coerce"),
            "pool_gib": pd.to_numeric(cycles["kv_pool_bytes"], errors="coerce") / GIB,
        },
        columns=columns,
    )
    frame = frame.dropna(subset=["pct", "blocks_total"])
    return frame[frame["blocks_total"] > 0].reset_index(drop=True)


def kv_pools(kv: pd.DataFrame) -> str:
    """The latest pool of each worker, e.g. ``w1: 4096 blocks, 2.00 GiB``."""
    latest = kv.groupby("worker_id", sort=True).tail(1).sort_values("worker_id")
    return "; ".join(
        f"{r.worker_id}: {r.blocks_total:.0f} blocks, {r.pool_gib:.2f} GiB"
        for r in latest.itertuples()
    )


def paired_series(cycles: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Several cycle columns as one long ``time, worker_id, series, value`` frame.

    ``columns`` maps a column to its series label, e.g. ``{"running": "running",
    "waiting": "waiting"}``; series appear in that order (the first is drawn solid).
    """
    parts = [cycle_series(cycles, column).assign(series=label) for column, label in columns.items()]
    parts = [part for part in parts if not part.empty]
    if not parts:
        return pd.DataFrame(columns=["time", "worker_id", "series", "value"])
    frame = pd.concat(parts, ignore_index=True)
    return frame.reindex(columns=["time", "worker_id", "series", "value"])


# What a worker's memory readings mean with the engine core (labels of its chart).
WORKER_MEMORY = {"memory_peak_bytes": "held", "memory_reserved_bytes": "reserved"}


def worker_memory_series(cycles: pd.DataFrame) -> pd.DataFrame:
    """The workers' own memory readings in GiB (``time, worker_id, series, gib``).

    "held": weights + KV blocks in use + activation peak, the memory that follows the
    tokens held; "reserved": everything torch holds, the whole preallocated KV pool
    included. A CPU worker reports no reservation: only "held" is drawn.
    """
    frame = paired_series(cycles, WORKER_MEMORY)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce") / GIB
    return frame.rename(columns={"value": "gib"})


def pool_and_tenants(cycles: pd.DataFrame) -> pd.DataFrame:
    """Each worker's KV pool beside the GPU memory of every other process, in GiB
    (``time, worker_id, series, gib``): what the agent sizes the pool against.

    "other processes": the driver's used memory (NVML) less what this worker's torch holds
    (``memory_reserved_bytes``, the pool included), so another tenant's allocation shows
    up as this line rising while the pool line falls. Cycles without an NVML reading (a
    CPU worker) give only the pool; no pool at all gives nothing.
    """
    columns = ["time", "worker_id", "series", "gib"]
    if cycles.empty or "kv_pool_bytes" not in cycles.columns:
        return pd.DataFrame(columns=columns)
    pool = pd.to_numeric(cycles["kv_pool_bytes"], errors="coerce")
    parts = [cycles.assign(series="KV pool", gib=pool / GIB)[pool > 0]]
    if parts[0].empty:  # no paged pool (the HF fallback, an older database): nothing to set
        return pd.DataFrame(columns=columns)  # the other processes against
    if {"nvml_used_bytes", "memory_reserved_bytes"} <= set(cycles.columns):
        used = pd.to_numeric(cycles["nvml_used_bytes"], errors="coerce")
        own = pd.to_numeric(cycles["memory_reserved_bytes"], errors="coerce")
        other = (used - own).clip(lower=0) / GIB
        parts.append(cycles.assign(series="other processes", gib=other)[other.notna()])
    frame = pd.concat([p[columns] for p in parts], ignore_index=True)
    return frame.sort_values(["time", "series"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class RequestOutcomes:
    """How the window's recorded requests finished."""

    finished: int
    cancelled: int
    errors: int

    def detail(self) -> str:
        done = self.finished - self.cancelled - self.errors
        return (
            f"{self.finished} requests finished in this window: {done} completed, "
            f"{self.cancelled} cancelled (client left or deadline passed), {self.errors} errors"
        )


def request_outcomes(requests: pd.DataFrame) -> RequestOutcomes:
    """Counts of the ``requests`` rows by finish reason."""
    if requests.empty or "finish_reason" not in requests.columns:
        return RequestOutcomes(0, 0, 0)
    reasons = requests["finish_reason"].astype(str)
    return RequestOutcomes(
        finished=len(reasons),
        cancelled=int((reasons == CANCELLED).sum()),
        errors=int((reasons == ERROR).sum()),
    )
