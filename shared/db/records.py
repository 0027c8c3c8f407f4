"""The records store: one interface over SQLite or Postgres, selected by URL.

Errors (all subclasses of :class:`RecordsError`)::

    RecordsError             a write or read failed because of what was asked (bad row, ...)
    └── DatabaseUnavailable  the database did not answer, is locked or read-only: retry later

A :class:`Records` holds one connection behind a lock, so one writer thread and any
number of reader threads may share it. After a connection error the connection is
dropped and the next call opens a new one, so a database that comes back is used again
without reopening the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel

from shared.db.backends import Backend, Statement, backend_for
from shared.db.tables import TABLES, Table, decode_row
from shared.schemas import (
    CycleStats,
    Decision,
    OomEvent,
    RequestRecord,
    TelemetrySample,
    WorkerInfo,
)

log = logging.getLogger(__name__)


class RecordsError(Exception):
    """A records operation failed."""


class DatabaseUnavailable(RecordsError):
    """The database could not be reached or written (down, locked, read-only)."""


class Records:
    """Write and read the AEGIS records; see :func:`open_records`."""

    def __init__(self, backend: Backend, *, create: bool = True) -> None:
        self.backend = backend
        self._lock = threading.RLock()
        self._conn: Any = None
        # Tables not there when a reader opened without creating: they read as empty.
        self._absent: set[str] = set()
        if create:
            self._create_tables()
        else:
            self._absent = self._find_absent()

    def _find_absent(self) -> set[str]:
        with self._connection() as conn:
            return {name for name in TABLES if not self.backend.columns_of(conn, name)}

    def _create_tables(self) -> None:
        """Create missing tables and indexes, and add columns new fields brought."""
        with self._connection() as conn, self.backend.transaction(conn, ddl=True):
            self.backend.prepare(conn)
            for table in TABLES.values():
                for statement in create_statements(table, self.backend):
                    conn.execute(statement)
                self._add_missing_columns(conn, table)

    def _add_missing_columns(self, conn: Any, table: Table) -> None:
        have = self.backend.columns_of(conn, table.name)
        for column in table.columns:
            if column.name not in have:
                log.warning("adding column %s to table %s", column.name, table.name)
                kind = self.backend.types[column.kind]
                conn.execute(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')

    # -- writers -------------------------------------------------------------------------

    def add_cycles(self, items: Sequence[CycleStats]) -> int:
        return self.add("cycles", items)

    def add_requests(self, items: Sequence[RequestRecord]) -> int:
        """Requests already recorded (same ``request_id``) are ignored."""
        return self.add("requests", items)

    def add_decisions(self, items: Sequence[Decision]) -> int:
        return self.add("decisions", items)

    def add_oom_events(self, items: Sequence[OomEvent]) -> int:
        return self.add("oom_events", items)

    def add_telemetry(self, items: Sequence[TelemetrySample]) -> int:
        """One row per GPU of every sample (one row for a sample without GPUs)."""
        return self.add("telemetry", items)

    def upsert_worker(self, info: WorkerInfo) -> int:
        """Insert the worker, or replace the stored row of the same ``worker_id``."""
        return self.add("workers", [info])

    def add(self, table_name: str, items: Sequence[BaseModel]) -> int:
        """Write ``items`` (models of the table) in one transaction; the rows written.

        TypeError when an item is not the table's model.
        """
        table = _table(table_name)
        columns = table.column_names
        rows = [tuple(row.get(c) for c in columns) for item in items for row in table.rows(item)]
        if not rows:
            return 0
        statement = insert_statement(table, self.backend.placeholder)
        with self._connection() as conn:
            return self.backend.write(conn, [(statement, rows)])

    # -- readers -------------------------------------------------------------------------

    def fetch(
        self,
        table: str,
        since: float | None = None,
        until: float | None = None,
        worker_id: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows with ``since <= ts < until`` (of one worker), oldest first, JSON decoded.

        With ``limit``, the *latest* ``limit`` matching rows (still oldest first), which
        is what a live view wants. ValueError for an unknown table, a ``worker_id`` filter
        on a table without workers (``telemetry``) or a limit below 1.
        """
        spec = _table(table)
        statement, params = select_statement(
            spec, self.backend.placeholder, since, until, worker_id, limit
        )
        with self._connection() as conn:
            if table in self._absent:
                if not self.backend.columns_of(conn, table):
                    return []
                self._absent.discard(table)  # a writer created it since
            rows = self.backend.query(conn, statement, params)
        return [decode_row(spec, row) for row in rows]

    def workers(self) -> list[WorkerInfo]:
        """Every worker ever announced, by start time."""
        return [WorkerInfo.model_validate(row) for row in self.fetch("workers")]

    # -- upkeep --------------------------------------------------------------------------

    def prune(self, older_than_ts: float) -> int:
        """Delete rows with ``ts < older_than_ts`` from every time-series table; how many."""
        mark = self.backend.placeholder
        work: list[Statement] = [
            (f'DELETE FROM "{table.name}" WHERE "ts" < {mark}', [(older_than_ts,)])
            for table in TABLES.values()
            if table.time_series
        ]
        with self._connection() as conn:
            return self.backend.write(conn, work)

    def ping(self) -> bool:
        """Whether the database answers right now."""
        try:
            with self._connection() as conn:
                self.backend.query(conn, "SELECT 1 AS ok", [])
        except RecordsError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The connection, under the lock; driver errors become RecordsError."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self.backend.connect()
                yield self._conn
            except self.backend.unavailable as exc:
                self._drop()
                # libpq messages span lines; one line keeps the logs readable
                message = " ".join(str(exc).split()) or type(exc).__name__
                raise DatabaseUnavailable(message) from exc
            except (TypeError, ValueError):
                raise
            except Exception as exc:
                raise RecordsError(f"{type(exc).__name__}: {exc}") from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is gone anyway
                log.debug("closing a broken database connection failed", exc_info=True)


def open_records(
    url: str, *, schema: str | None = None, timeout_s: float = 5.0, create: bool = True
) -> Records:
    """Open the store at ``url``, creating its tables (idempotent) unless ``create`` is
    False (a read-only reader such as the dashboard: missing tables read as empty).

    ``sqlite:///abs/path.db`` (parent directory created) or ``postgresql://...``;
    ``schema`` (Postgres only) puts the tables in that schema, created if needed.
    ``timeout_s`` bounds waiting for a lock (SQLite) or a connection (Postgres).
    ValueError for a bad URL; DatabaseUnavailable when the database does not answer.
    """
    return Records(backend_for(url, schema=schema, timeout_s=timeout_s), create=create)


def _table(name: str) -> Table:
    try:
        return TABLES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None


# -- SQL -------------------------------------------------------------------------------------


def create_statements(table: Table, backend: Backend) -> list[str]:
    """CREATE TABLE / INDEX statements for ``table`` (all IF NOT EXISTS)."""
    columns = [f'"{c.name}" {backend.types[c.kind]}' for c in table.columns]
    if table.has_id:
        columns.insert(0, backend.id_column)
    statements = [f'CREATE TABLE IF NOT EXISTS "{table.name}" ({", ".join(columns)})']
    indexed = ["ts"] + (["worker_id"] if table.has_column("worker_id") else [])
    for column in indexed:
        statements.append(
            f'CREATE INDEX IF NOT EXISTS "ix_{table.name}_{column}" ON "{table.name}" ("{column}")'
        )
    if table.unique:
        statements.append(
            f'CREATE UNIQUE INDEX IF NOT EXISTS "ux_{table.name}_{table.unique}" '
            f'ON "{table.name}" ("{table.unique}")'
        )
    return statements


def insert_statement(table: Table, placeholder: str) -> str:
    """INSERT of one row; duplicates of the unique column are ignored or replace the row."""
    names = ", ".join(f'"{name}"' for name in table.column_names)
    values = ", ".join([placeholder] * len(table.columns))
    statement = f'INSERT INTO "{table.name}" ({names}) VALUES ({values})'
    if table.unique and table.upsert:
        updates = ", ".join(
            f'"{n}" = excluded."{n}"' for n in table.column_names if n != table.unique
        )
        statement += f' ON CONFLICT ("{table.unique}") DO UPDATE SET {updates}'
    elif table.unique:
        statement += f' ON CONFLICT ("{table.unique}") DO NOTHING'
    return statement


def select_statement(
    table: Table,
    placeholder: str,
    since: float | None,
    until: float | None,
    worker_id: str | None,
    limit: int | None,
) -> tuple[str, list[Any]]:
    """The SELECT behind :meth:`Records.fetch` and its parameters."""
    where, params = [], []
    for clause, value in (('"ts" >= ', since), ('"ts" < ', until), ('"worker_id" = ', worker_id)):
        if value is not None:
            where.append(clause + placeholder)
            params.append(value)
    if worker_id is not None and not table.has_column("worker_id"):
        raise ValueError(f"table {table.name!r} has no worker_id column")
    tiebreak = '"id"' if table.has_id else f'"{table.unique}"'
    statement = f'SELECT * FROM "{table.name}"'
    if where:
        statement += " WHERE " + " AND ".join(where)
    if limit is None:
        return f'{statement} ORDER BY "ts", {tiebreak}', params
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    latest = f'{statement} ORDER BY "ts" DESC, {tiebreak} DESC LIMIT {limit}'
    return f'SELECT * FROM ({latest}) AS latest ORDER BY "ts", {tiebreak}', params
