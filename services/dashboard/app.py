"""AEGIS live dashboard: read-only views of the records database, refreshed every few seconds.

Run with ``streamlit run services/dashboard/app.py`` (``AEGIS_DATABASE_URL`` selects the
database; empty means the embedded SQLite file under ``AEGIS_DATA_DIR``). The sidebar
(window and filters) runs with the page; everything below the title is one fragment
that reruns every ``refresh_s`` seconds. Every section sits in a container keyed
``section-<name>`` (CSS class ``st-key-section-<name>``) so browser tests can find it.
A database that is missing, empty or unreachable gives a message, never a traceback.
The page reads the records database, and Redis only for the dead letters (read-only,
short timeouts: an unreachable Redis is said in their section).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import altair as alt
import pandas as pd
import redis
import streamlit as st
from pydantic import ValidationError

from services.dashboard import charts, data, engine, letters, source
from services.dashboard.config import DashboardSettings
from services.dashboard.data import Filters
from services.dashboard.letters import DeadLetters
from services.dashboard.source import Snapshot
from shared.db import Records, RecordsError
from shared.keys import Keys
from shared.logs import setup_logging

log = logging.getLogger(__name__)
# Failures reading the database that become a message on the page.
READ_ERRORS = (RecordsError, OSError, ValueError)
# Cycle columns drawn together, one line style per series (the first solid).
RUNNING = {"running": "running", "waiting": "waiting"}
TTFT = {"ttft_p50_s": "p50", "ttft_p95_s": "p95"}
TTFT_NOTE = (
    "With AEGIS_TTFT_TARGET_MS set, the dashed line is the target the agent keeps the p95 "
    "under (its decisions say which lever it moved and what tokens/s it gave up)."
)
POOL_NOTE = (
    "The agent shrinks the pool when other processes take GPU memory and grows it back "
    "when they free it; other processes = NVML used - this worker's torch reservation."
)
ITL = {"itl_p50_s": "p50", "itl_p95_s": "p95"}
PHASES = {"decode_tokens": "decode", "prefill_tokens": "prefill"}
KV_TOOLTIP = (
    alt.Tooltip("blocks_used:Q", title="blocks used", format=",.0f"),
    alt.Tooltip("blocks_total:Q", title="blocks total", format=",.0f"),
    alt.Tooltip("pool_gib:Q", title="pool GiB", format=",.2f"),
)
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


def _headline(snapshot: Snapshot, dead: DeadLetters | str) -> None:
    """Two rows of numbers: the engine core's now, then settings and what went wrong."""
    head = data.headline(snapshot.cycles, snapshot.oom_events)
    core = engine.engine_headline(snapshot.cycles)
    outcomes = engine.request_outcomes(snapshot.requests)
    tokens = "-" if head.tokens_per_s is None else f"{head.tokens_per_s:,.1f}"
    queue = "-" if head.queue_depth is None else str(head.queue_depth)
    detail = head.per_worker or None
    with st.container(key="section-metrics"):
        core_row = st.columns(6)
        core_row[0].metric("Tokens/s now", tokens)
        core_row[1].metric("Running / waiting", core.running_waiting, help=RUNNING_HELP)
        core_row[2].metric("KV cache used", core.kv_usage, help=core.kv_detail or None)
        core_row[3].metric("TTFT p95", core.ttft_p95, help=TTFT_HELP)
        core_row[4].metric("Preemptions in window", core.preemptions)
        core_row[5].metric("Queue depth", queue)
        # Precision gets more room: with several workers it reads like "bf16/fp16".
        cols = st.columns([1.5, 1.1, 1, 1, 1, 0.4])
        cols[0].metric("Precision", head.precision, help=detail)
        cols[1].metric("Settings version", head.settings_version, help=detail)
        cols[2].metric("OOMs in window", str(head.oom_count))
        cols[3].metric("Cancelled in window", str(outcomes.cancelled), help=outcomes.detail())
        letters_count = "-" if isinstance(dead, str) else str(dead.total)
        cols[4].metric("Dead letters", letters_count, help=DEAD_LETTERS_HELP)
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
            if section.note:
                st.caption(section.note)


NO_CYCLES = "No worker cycles"
# Said where cycles lack the engine core's columns (written by an older version).
NO_CORE = "No engine-core statistics"
WORKER_MEMORY_NOTE = (
    "held: weights + KV blocks in use + activation peak (follows the tokens held); "
    "reserved: all that torch holds, the whole preallocated KV pool included."
)
RUNNING_HELP = (
    "Sequences in the engine core's running batch / waiting for a place in it, at the end "
    "of each worker's latest window (summed over workers)."
)
TTFT_HELP = "Time to first token, p95 of the latest window (highest worker)."
DEAD_LETTERS_HELP = (
    "Requests given up after too many failed deliveries (their clients got an error), "
    "ever recorded; the table below lists this window's."
)


class Section(NamedTuple):
    """One chart on the page; ``empty`` is said instead when ``chart`` is None.

    ``note`` is a caption under the chart.
    """

    key: str
    title: str
    chart: alt.LayerChart | None
    empty: str
    note: str = ""


def _sections(
    snapshot: Snapshot, timeline: charts.Timeline, max_points: int, ttft_target_ms: float | None
) -> list[Section]:
    """The time charts in page order (two per row): the engine core's first."""
    cycles, telemetry = snapshot.cycles, snapshot.telemetry

    def lines(
        frame: pd.DataFrame,
        value: str,
        title: str,
        color: str,
        dash: str | None = None,
        extra: tuple[alt.Tooltip, ...] = (),
    ) -> alt.LayerChart | None:
        frame = data.thin(frame, max_points)
        if frame.empty:
            return None
        return charts.time_chart(frame, value, title, color, timeline, dash=dash, extra=extra)

    def per_worker(column: str, title: str) -> alt.LayerChart | None:
        return lines(data.cycle_series(cycles, column), "value", title, "worker_id")

    def pair(columns: dict[str, str], title: str) -> alt.LayerChart | None:
        frame = engine.paired_series(cycles, columns)
        return lines(frame, "value", title, "worker_id", "series")

    memory = data.memory_series(telemetry, cycles)
    memory_frame = data.thin(memory.frame, max_points)
    memory_chart = None
    if not memory_frame.empty:
        levels = data.threshold_levels(memory.frame)
        memory_chart = charts.memory_chart(memory_frame, levels, timeline)
    utilisation = lines(data.utilisation_series(telemetry, cycles), "pct", "%", "device")
    latency = lines(data.latency_series(cycles), "seconds", "seconds", "worker_id", "quantile")
    kv = engine.kv_series(cycles)
    kv_chart = lines(kv, "pct", "% of KV blocks", "worker_id", extra=KV_TOOLTIP)
    pools = engine.kv_pools(kv)
    ttft = pair(TTFT, "TTFT s")
    if ttft is not None and ttft_target_ms is not None:
        ttft = charts.with_target(ttft, ttft_target_ms / 1000, "target")
    tenants = lines(
        engine.pool_and_tenants(cycles), "gib", "pool / other GiB", "worker_id", "series"
    )
    return [
        Section("tokens", "Tokens/s", per_worker("tokens_per_s", "tokens/s"), NO_CYCLES),
        Section("running", "Running / waiting sequences", pair(RUNNING, "sequences"), NO_CORE),
        Section("kv", "KV cache used %", kv_chart, NO_CORE, f"KV pool: {pools}" if pools else ""),
        Section(
            "preemptions",
            "Preemptions per window",
            per_worker("preemptions", "preemptions"),
            NO_CORE,
        ),
        Section("ttft", "Time to first token p50/p95", ttft, NO_CORE, TTFT_NOTE),
        Section("itl", "Inter-token latency p50/p95", pair(ITL, "inter-token s"), NO_CORE),
        Section("prefill", "Prefill / decode tokens per window", pair(PHASES, "tokens"), NO_CORE),
        Section(
            "batch", "Max running sequences", per_worker("batch_size", "max running"), NO_CYCLES
        ),
        Section("pool", "KV pool vs other processes' GPU memory", tenants, NO_CORE, POOL_NOTE),
        Section("memory", MEMORY_TITLES[memory.source], memory_chart, "No memory readings"),
        Section(
            "worker-memory",
            "Worker memory: held / reserved",
            lines(engine.worker_memory_series(cycles), "gib", "worker GiB", "worker_id", "series"),
            "No worker memory readings",
            WORKER_MEMORY_NOTE,
        ),
        Section("utilisation", "GPU utilisation %", utilisation, "No GPU utilisation readings"),
        Section("latency", "Request latency p50/p95", latency, NO_CYCLES),
        Section("queue", "Queue depth", per_worker("queue_depth", "requests"), NO_CYCLES),
    ]


def _charts(snapshot: Snapshot, view: View) -> None:
    """The time charts over the view's window, each with the decision and OOM marks."""
    timeline = charts.Timeline(
        data.decision_marks(snapshot.decisions),
        data.oom_marks(snapshot.oom_events),
        view.since,
        view.now,
    )
    sections = _sections(snapshot, timeline, view.max_points, view.ttft_target_ms)
    # A row of columns per pair keeps the rows aligned when a chart is only a caption.
    for row in range(0, len(sections), 2):
        for column, section in zip(st.columns(2), sections[row : row + 2], strict=False):
            with column:
                _chart(section)


def _dead_letters_section(dead: DeadLetters | str, filters: Filters) -> None:
    """The window's dead letters, newest first, or why they can't be shown."""
    with st.container(key="section-dead-letters"):
        st.subheader("Dead letters")
        if isinstance(dead, str):
            st.warning(dead, icon="⚠️")
            return
        table = letters.dead_letters_table(dead.letters, filters.workers)
        if table.empty:
            st.caption(f"No dead letters in this window ({dead.total} ever recorded).")
            return
        st.caption(f"{dead.total} ever recorded; the latest of this window:")
        st.dataframe(table, hide_index=True, width="stretch")


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


class View(NamedTuple):
    """What one refresh shows: the window [since, now] and the filters."""

    window: str
    since: float | None
    now: float
    filters: Filters
    max_points: int
    ttft_target_ms: float | None = None


def _page(snapshot: Snapshot, dead: DeadLetters | str, view: View) -> None:
    """Everything drawn from one snapshot of the window and its dead letters."""
    window = view.window
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
    _headline(snapshot, dead)
    _charts(snapshot, view)
    _tables(snapshot)
    _dead_letters_section(dead, view.filters)


def _read_error(url: str, exc: Exception) -> str:
    """What the page says when the records can't be read."""
    where = source.redact(url)
    if isinstance(exc, ValueError):
        return f"Bad database URL {where}: {exc}. Set AEGIS_DATABASE_URL."
    return f"Database unreachable ({where}): {exc}. Retrying at every refresh."


@st.cache_resource(show_spinner=False)
def _redis(url: str, timeout_s: float) -> redis.Redis:
    """One Redis client per URL (its pool reconnects by itself after an outage)."""
    return letters.client_for(url, timeout_s)


def _read_dead_letters(settings: DashboardSettings, since: float | None) -> DeadLetters | str:
    """The window's dead letters, or the message saying Redis could not be read."""
    try:
        client = _redis(settings.redis_url, settings.redis_timeout_s)
        keys = Keys(settings.key_prefix)
        return letters.read_dead_letters(client, keys, since, settings.dead_letter_rows)
    except (redis.RedisError, ValueError) as exc:
        where = source.redact(settings.redis_url)
        log.warning("reading dead letters from %s failed: %s", where, exc)
        return (
            f"Dead letters unknown: Redis unreachable ({where}): {exc}. Retrying at every refresh."
        )


def _live(settings: DashboardSettings, window: str, filters: Filters) -> None:
    """One refresh: read the window, draw it; a database error becomes a message."""
    url, max_rows = settings.resolved_database_url(), settings.max_rows
    started = time.time()
    since = data.window_since(window, started)
    try:
        snapshot = _read(url, since, max_rows)
    except READ_ERRORS as exc:
        log.warning("reading %s failed: %s", source.redact(url), exc)
        st.error(_read_error(url, exc))
        return
    dead = _read_dead_letters(settings, since)
    try:
        shown = source.filter_snapshot(snapshot, filters)
        view = View(window, since, started, filters, max(100, max_rows // 4),
                    settings.ttft_target_ms)  # fmt: skip
        _page(shown, dead, view)
    except Exception as exc:  # a bad row must not take the page down: say so and go on
        log.exception("drawing the dashboard failed")
        st.error(f"Could not draw the records: {type(exc).__name__}: {exc}")
    full = [name for name in source.READ_TABLES if len(snapshot.frame(name)) >= max_rows]
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
    live(settings, window, filters)


main()
