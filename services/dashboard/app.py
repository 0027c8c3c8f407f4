"""AEGIS live dashboard: read-only views of the records database, refreshed every few seconds.

Run with ``streamlit run services/dashboard/app.py`` (``AEGIS_DATABASE_URL`` selects the
database; empty means the embedded SQLite file under ``AEGIS_DATA_DIR``). The sidebar
(window and filters) runs with the page; everything below the title is one fragment
that reruns every ``refresh_s`` seconds. Every section sits in a container keyed
``section-<name>`` (CSS class ``st-key-section-<name>``) so browser tests can find it.
A database that is missing, empty or unreachable gives a message, never a traceback.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import altair as alt
import pandas as pd
import streamlit as st
from pydantic import ValidationError

from services.dashboard import charts, data, source
from services.dashboard.config import DashboardSettings
from services.dashboard.data import Filters
from services.dashboard.source import Snapshot
from shared.db import Records, RecordsError
from shared.logs import setup_logging

log = logging.getLogger(__name__)
# Failures reading the database that become a message on the page.
READ_ERRORS = (RecordsError, OSError, ValueError)
MEMORY_TITLES = {
    "gpu": "GPU memory",
    "worker": "GPU memory (worker readings)",
    "host": "Host memory (no GPU)",
    "": "GPU memory",
}


@st.cache_resource(show_spinner=False)
def _setup_logging(level: str, json_output: bool) -> None:
    """Logging configured once per server process (reruns must not redo it)."""
    setup_logging(level, json_output, service="dashboard")


def _settings() -> DashboardSettings:
    """Settings from the environment, read at every full run (cheap; pydantic errors shown)."""
    settings = DashboardSettings()
    _setup_logging(settings.log_level, settings.log_json)
    return settings


@st.cache_resource(show_spinner=False)
def _records(url: str) -> Records:
    """One shared store per URL (it reconnects by itself after an outage).

    A failure is not cached, so the next refresh tries again.
    """
    return source.connect(url)


def _read(url: str, since: float | None, max_rows: int) -> Snapshot:
    """The window's records; an empty snapshot while the SQLite file does not exist."""
    if source.database_missing(url):
        return source.empty_snapshot()
    return source.load_snapshot(_records(url), since, max_rows)


def _sidebar(settings: DashboardSettings, url: str) -> tuple[str, Filters]:
    """Window and filter widgets; the filter options come from the records when readable."""
    st.sidebar.header("View")
    labels = list(data.WINDOWS)
    default = labels.index(data.window_label(settings.window_minutes))
    window = st.sidebar.selectbox("Time window", labels, index=default, key="window")
    try:
        snapshot = _read(url, None, 1)
    except READ_ERRORS:
        snapshot = source.empty_snapshot()
    workers = data.worker_options(snapshot.workers, snapshot.cycles)
    gpus = data.gpu_options(snapshot.workers, snapshot.telemetry)
    chosen = st.sidebar.multiselect("Workers (none = all)", workers, key="workers")
    chosen_gpus = st.sidebar.multiselect("GPUs (none = all)", gpus, key="gpus")
    st.sidebar.caption(f"Database: `{source.redact(url)}`")
    st.sidebar.caption(f"Refresh every {settings.refresh_s:g} s")
    return window, Filters(workers=tuple(chosen), gpus=tuple(chosen_gpus))


def _headline(snapshot: Snapshot) -> None:
    head = data.headline(snapshot.cycles, snapshot.oom_events)
    tokens = "-" if head.tokens_per_s is None else f"{head.tokens_per_s:,.1f}"
    queue = "-" if head.queue_depth is None else str(head.queue_depth)
    with st.container(key="section-metrics"):
        # Precision gets more room: with several workers it reads like "bf16/fp16".
        cols = st.columns([1.1, 1, 1.5, 1.1, 1, 1])
        cols[0].metric("Tokens/s now", tokens)
        detail = head.per_worker or None
        cols[1].metric("Batch size", head.batch_size, help=detail)
        cols[2].metric("Precision", head.precision, help=detail)
        cols[3].metric("Settings version", head.settings_version, help=detail)
        cols[4].metric("OOMs in window", str(head.oom_count))
        cols[5].metric("Queue depth", queue)
        if head.last_cycle_ts is not None:
            st.caption(f"Last cycle {max(0.0, time.time() - head.last_cycle_ts):.0f} s ago")


def _chart(section: Section) -> None:
    """One titled chart section, or a caption saying why there is nothing to draw."""
    with st.container(key=f"section-{section.key}"):
        st.subheader(section.title)
        if section.chart is None:
            st.caption(f"{section.empty.rstrip('.')} in this window.")
        else:
            st.altair_chart(section.chart, width="stretch")


NO_CYCLES = "No worker cycles"


class Section(NamedTuple):
    """One chart on the page; ``empty`` is said instead when ``chart`` is None."""

    key: str
    title: str
    chart: alt.LayerChart | None
    empty: str


def _sections(snapshot: Snapshot, timeline: charts.Timeline, max_points: int) -> list[Section]:
    """The time charts in page order (two per row)."""
    cycles, telemetry = snapshot.cycles, snapshot.telemetry

    def lines(
        frame: pd.DataFrame, value: str, title: str, color: str, dash: str | None = None
    ) -> alt.LayerChart | None:
        frame = data.thin(frame, max_points)
        if frame.empty:
            return None
        return charts.time_chart(frame, value, title, color, timeline, dash=dash)

    def per_worker(column: str, title: str) -> alt.LayerChart | None:
        return lines(data.cycle_series(cycles, column), "value", title, "worker_id")

    memory = data.memory_series(telemetry, cycles)
    memory_frame = data.thin(memory.frame, max_points)
    memory_chart = None
    if not memory_frame.empty:
        levels = data.threshold_levels(memory.frame)
        memory_chart = charts.memory_chart(memory_frame, levels, timeline)
    utilisation = lines(data.utilisation_series(telemetry, cycles), "pct", "%", "device")
    latency = lines(data.latency_series(cycles), "seconds", "seconds", "worker_id", "quantile")
    return [
        Section("tokens", "Tokens/s", per_worker("tokens_per_s", "tokens/s"), NO_CYCLES),
        Section("batch", "Batch size", per_worker("batch_size", "batch size"), NO_CYCLES),
        Section("memory", MEMORY_TITLES[memory.source], memory_chart, "No memory readings"),
        Section("utilisation", "GPU utilisation %", utilisation, "No GPU utilisation readings"),
        Section("latency", "Latency p50/p95", latency, NO_CYCLES),
        Section("queue", "Queue depth", per_worker("queue_depth", "requests"), NO_CYCLES),
    ]


def _charts(snapshot: Snapshot, max_points: int, start: float | None, end: float) -> None:
    """The time charts over [start, end], each with the decision and OOM marks."""
    timeline = charts.Timeline(
        data.decision_marks(snapshot.decisions), data.oom_marks(snapshot.oom_events), start, end
    )
    sections = _sections(snapshot, timeline, max_points)
    # A row of columns per pair keeps the rows aligned when a chart is only a caption.
    for row in range(0, len(sections), 2):
        for column, section in zip(st.columns(2), sections[row : row + 2], strict=False):
            with column:
                _chart(section)


def _tables(snapshot: Snapshot) -> None:
    """The decisions and OOM events of the window, newest first."""
    with st.container(key="section-decisions"):
        st.subheader("Decisions")
        table = data.decisions_table(snapshot.decisions)
        if table.empty:
            st.caption("No decisions in this window.")
        else:
            st.dataframe(table, hide_index=True, width="stretch")
    with st.container(key="section-ooms"):
        st.subheader("OOM events")
        table = data.oom_table(snapshot.oom_events)
        if table.empty:
            st.caption("No OOM events in this window.")
        else:
            st.dataframe(table, hide_index=True, width="stretch")


def _page(
    snapshot: Snapshot, window: str, since: float | None, now: float, max_points: int
) -> None:
    """Everything drawn from one snapshot of the window [since, now]."""
    for message in data.banners(snapshot.workers, snapshot.telemetry):
        st.warning(message, icon="⚠️")
    if snapshot.empty:
        where = "" if window == "all" else f" in the last {window}"
        hint = "pick a longer window, or s" if snapshot.workers else "S"
        st.info(
            f"No data yet{where}: no cycles, decisions, OOM events or telemetry recorded. "
            f"{hint}tart the runtime (workers, monitor, agent) and this page fills in."
        )
        return
    _headline(snapshot)
    _charts(snapshot, max_points, since, now)
    _tables(snapshot)


def _read_error(url: str, exc: Exception) -> str:
    """What the page says when the records can't be read."""
    where = source.redact(url)
    if isinstance(exc, ValueError):
        return f"Bad database URL {where}: {exc}. Set AEGIS_DATABASE_URL."
    return f"Database unreachable ({where}): {exc}. Retrying at every refresh."


def _live(url: str, window: str, filters: Filters, max_rows: int) -> None:
    """One refresh: read the window, draw it; a database error becomes a message."""
    started = time.time()
    since = data.window_since(window, started)
    try:
        snapshot = _read(url, since, max_rows)
    except READ_ERRORS as exc:
        log.warning("reading %s failed: %s", source.redact(url), exc)
        st.error(_read_error(url, exc))
        return
    try:
        shown = source.filter_snapshot(snapshot, filters)
        _page(shown, window, since, started, max_points=max(100, max_rows // 4))
    except Exception as exc:  # a bad row must not take the page down: say so and go on
        log.exception("drawing the dashboard failed")
        st.error(f"Could not draw the records: {type(exc).__name__}: {exc}")
    full = [name for name in source.SHOWN_TABLES if len(snapshot.frame(name)) >= max_rows]
    if full:
        st.caption(
            f"Showing only the latest {max_rows:,} rows of {', '.join(full)} in this window "
            "(AEGIS_MAX_ROWS raises the limit)."
        )
    st.caption(f"Updated {time.strftime('%H:%M:%S')} in {time.time() - started:.2f} s")


def main() -> None:
    """The page: title, sidebar, and the live fragment."""
    st.set_page_config(page_title="AEGIS dashboard", layout="wide")
    st.title("AEGIS Runtime")
    try:
        settings = _settings()
    except ValidationError as exc:
        st.error(f"Bad dashboard settings (AEGIS_* environment): {exc}")
        return
    url = settings.resolved_database_url()
    window, filters = _sidebar(settings, url)
    live = st.fragment(run_every=settings.refresh_s)(_live)
    live(url, window, filters, settings.max_rows)


main()
