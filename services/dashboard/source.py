"""Reading the records database for the dashboard: one :class:`Snapshot` per refresh.

The dashboard only ever reads. A SQLite file that does not exist yet is reported as
"no database yet" instead of being created; :func:`shared.db.open_records` is called
only on an existing file (or on Postgres), where its table set-up is idempotent.
Errors from the database surface as :class:`shared.db.RecordsError` (or ``ValueError``
for a bad URL); the app turns them into a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd

from services.dashboard.data import Filters, apply_filters, to_frame
from shared.db import TABLES, Records, open_records
from shared.schemas import WorkerInfo

# Tables drawn over time by the dashboard; ``requests`` is only counted (finish reasons).
SHOWN_TABLES = ("cycles", "decisions", "oom_events", "telemetry")
READ_TABLES = (*SHOWN_TABLES, "requests")


@dataclass(frozen=True)
class Snapshot:
    """The records of one time window, as frames with every column of their table."""

    cycles: pd.DataFrame
    decisions: pd.DataFrame
    oom_events: pd.DataFrame
    telemetry: pd.DataFrame
    workers: list[WorkerInfo] = field(default_factory=list)
    requests: pd.DataFrame = field(default_factory=lambda: _empty("requests"))

    @property
    def empty(self) -> bool:
        """No time-series rows in the window (workers alone don't make data)."""
        return all(frame.empty for frame in (self.frame(name) for name in SHOWN_TABLES))

    def frame(self, table: str) -> pd.DataFrame:
        frame: pd.DataFrame = getattr(self, table)
        return frame


def _empty(table: str) -> pd.DataFrame:
    return to_frame([], TABLES[table].column_names)


def empty_snapshot() -> Snapshot:
    """A snapshot with no rows (used before the database exists)."""
    return Snapshot(**{name: _empty(name) for name in READ_TABLES})


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and ``:memory:``)."""
    if urlsplit(url).scheme.lower() != "sqlite":
        return None
    path = unquote(url.split(":", 1)[1]).lstrip("/")
    return None if path in ("", ":memory:") else Path("/" + path)


def database_missing(url: str) -> bool:
    """Whether the URL names a SQLite file that nobody has created yet."""
    path = sqlite_path(url)
    return path is not None and not path.exists()


def redact(url: str) -> str:
    """The URL without its password, for display."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, timeout_s: float = 2.0) -> Records:
    """Open the records at ``url`` (see module docstring: never on a missing SQLite file)."""
    if database_missing(url):
        raise FileNotFoundError(f"no database file at {sqlite_path(url)}")
    return open_records(url, timeout_s=timeout_s, create=False)  # read-only: create nothing


def load_snapshot(records: Records, since: float | None, max_rows: int) -> Snapshot:
    """The latest ``max_rows`` rows per table with ``ts >= since``, and every worker."""
    frames = {
        name: to_frame(records.fetch(name, since=since, limit=max_rows), TABLES[name].column_names)
        for name in READ_TABLES
    }
    return Snapshot(**frames, workers=records.workers())


def filter_snapshot(snapshot: Snapshot, filters: Filters) -> Snapshot:
    """The snapshot restricted to the chosen workers and GPUs.

    Telemetry has no worker: with workers chosen (and no GPU), it keeps the GPUs those
    workers run on, and the host-only rows of their hosts.
    """
    telemetry = apply_filters(snapshot.telemetry, Filters(gpus=filters.gpus))
    if filters.workers and not filters.gpus:
        chosen = [w for w in snapshot.workers if w.worker_id in filters.workers]
        telemetry = _telemetry_of(telemetry, chosen)
    # Requests carry no GPU: a GPU filter keeps the requests of the workers on those GPUs.
    request_workers = filters.workers
    if filters.gpus:
        on_gpus = {w.worker_id for w in snapshot.workers if w.gpu_index in filters.gpus}
        request_workers = tuple(sorted(on_gpus & set(filters.workers or on_gpus)))
        request_workers = request_workers or ("",)  # no worker on those GPUs: no requests
    return Snapshot(
        cycles=apply_filters(snapshot.cycles, filters),
        decisions=apply_filters(snapshot.decisions, Filters(workers=filters.workers)),
        oom_events=apply_filters(snapshot.oom_events, filters),
        telemetry=telemetry,
        workers=[
            w for w in snapshot.workers if not filters.workers or w.worker_id in filters.workers
        ],
        requests=apply_filters(snapshot.requests, Filters(workers=request_workers)),
    )


def _telemetry_of(telemetry: pd.DataFrame, workers: list[WorkerInfo]) -> pd.DataFrame:
    """Telemetry rows of the GPUs (or, GPU-less, the hosts) of ``workers``."""
    gpus = {(w.host, w.gpu_index) for w in workers if w.gpu_index is not None}
    hosts = {w.host for w in workers}
    keep = [
        (host, int(index)) in gpus if pd.notna(index) else host in hosts
        for host, index in zip(telemetry["host"], telemetry["gpu_index"], strict=True)
    ]
    return telemetry[pd.Series(keep, index=telemetry.index, dtype=bool)].reset_index(drop=True)
