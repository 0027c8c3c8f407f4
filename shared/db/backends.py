"""The two database backends: SQLite (embedded default) and Postgres (psycopg 3).

A backend is the only place that knows a driver: how to connect, which SQL types and
placeholder it uses, and which driver errors mean "the database is not answering" (as
opposed to "this row is bad"). :class:`shared.db.records.Records` does the rest in
portable SQL.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

from shared.db.tables import Kind

# A SQL statement and the parameter tuples to run it with.
Statement = tuple[str, list[tuple[Any, ...]]]

# Any constant: the key of the advisory lock that serialises creating the tables.
DDL_LOCK_ID = 0xAE615
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Backend(ABC):
    """How to talk to one kind of database."""

    placeholder: str
    id_column: str
    types: dict[Kind, str]
    # Driver errors meaning the database is unreachable, locked or read-only: worth retrying.
    unavailable: tuple[type[BaseException], ...]

    @abstractmethod
    def connect(self) -> Any:
        """A new DB-API connection, ready for :meth:`query` / :meth:`write`."""

    @abstractmethod
    def query(self, conn: Any, statement: str, params: list[Any]) -> list[dict[str, Any]]:
        """Rows of a SELECT as dicts keyed by column name."""

    @abstractmethod
    def transaction(self, conn: Any, *, ddl: bool = False) -> AbstractContextManager[None]:
        """Commit the block's statements together (roll back on error); with ``ddl``,
        also exclude other processes changing the tables at the same time."""

    @abstractmethod
    def columns_of(self, conn: Any, table: str) -> set[str]:
        """Names of the columns ``table`` has in the database (empty when it doesn't exist)."""

    def write(self, conn: Any, work: list[Statement]) -> int:
        """Run each statement for each of its rows, all in one transaction; the rows
        changed."""
        changed = 0
        with self.transaction(conn):
            cursor = conn.cursor()
            for statement, rows in work:
                cursor.executemany(statement, rows)
                changed += max(cursor.rowcount, 0)
        return changed

    def prepare(self, conn: Any) -> None:  # noqa: B027 - optional hook
        """Set-up at open, inside the DDL transaction (e.g. creating a schema)."""


class SqliteBackend(Backend):
    """A SQLite file in WAL mode: readers in other processes don't block the writer."""

    placeholder = "?"
    id_column = '"id" INTEGER PRIMARY KEY AUTOINCREMENT'
    types = {
        Kind.INT: "INTEGER",
        Kind.FLOAT: "REAL",
        Kind.TEXT: "TEXT",
        Kind.BOOL: "INTEGER",
        Kind.JSON: "TEXT",
    }
    unavailable = (sqlite3.OperationalError,)

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection is shared by threads behind the Records lock.
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_s, check_same_thread=False, isolation_level=None
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        self._enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, retrying: converting a fresh file needs an exclusive lock, and
        SQLite answers "database is locked" at once (no busy handler) while services
        that start together open it at the same moment."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def query(self, conn: Any, statement: str, params: list[Any]) -> list[dict[str, Any]]:
        return [dict(row) for row in conn.execute(statement, params).fetchall()]

    @contextlib.contextmanager
    def transaction(self, conn: Any, *, ddl: bool = False) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front (DDL included), so a busy database
        # fails here, cleanly, after the busy timeout.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def columns_of(self, conn: Any, table: str) -> set[str]:
        return {row["name"] for row in self.query(conn, f'PRAGMA table_info("{table}")', [])}


class PostgresBackend(Backend):
    """Postgres through psycopg 3; optionally every table lives in ``schema``."""

    placeholder = "%s"
    id_column = '"id" BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY'
    types = {
        Kind.INT: "BIGINT",
        Kind.FLOAT: "DOUBLE PRECISION",
        Kind.TEXT: "TEXT",
        Kind.BOOL: "BOOLEAN",
        Kind.JSON: "TEXT",
    }
    unavailable = (psycopg.OperationalError, psycopg.InterfaceError)

    def __init__(self, url: str, schema: str | None, timeout_s: float) -> None:
        if schema is not None and not SCHEMA_NAME.match(schema):
            raise ValueError(f"bad Postgres schema name {schema!r}")
        self.url = url
        self.schema = schema
        # libpq treats anything under 2 s as 2 s.
        self.connect_timeout = max(2, round(timeout_s))

    def connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=self.connect_timeout, row_factory=dict_row
        )
        if self.schema:
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self.schema)))
        return conn

    def prepare(self, conn: Any) -> None:
        if self.schema:
            create = pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
            conn.execute(create.format(pgsql.Identifier(self.schema)))

    def query(self, conn: Any, statement: str, params: list[Any]) -> list[dict[str, Any]]:
        return list(conn.execute(statement, params).fetchall())

    @contextlib.contextmanager
    def transaction(self, conn: Any, *, ddl: bool = False) -> Iterator[None]:
        with conn.transaction():
            if ddl:
                # Concurrent CREATE TABLE IF NOT EXISTS can fail in Postgres; serialise it.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [DDL_LOCK_ID])
            yield

    def columns_of(self, conn: Any, table: str) -> set[str]:
        rows = self.query(
            conn,
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            [table],
        )
        return {row["column_name"] for row in rows}


def backend_for(url: str, schema: str | None = None, timeout_s: float = 5.0) -> Backend:
    """The backend a URL selects; ValueError for anything else.

    ``sqlite:///abs/path.db`` (any number of slashes: the path is absolute) or
    ``sqlite:///:memory:``; ``postgresql://...`` / ``postgres://...`` (libpq URL, may
    carry ``?options=-csearch_path%3Dxxx``).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        if schema is not None:
            raise ValueError("a schema applies to Postgres only")
        return SqliteBackend(_sqlite_path(url), timeout_s)
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(url, schema, timeout_s)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://...")


def _sqlite_path(url: str) -> str:
    path = unquote(url.split(":", 1)[1]).lstrip("/")
    if not path:
        raise ValueError(f"SQLite URL without a path: {url!r}")
    return path if path == ":memory:" else "/" + path
