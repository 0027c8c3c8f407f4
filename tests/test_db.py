"""The records store against real SQLite and Postgres databases (both, every test)."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shared.config import CommonSettings
from shared.db import TABLES, DatabaseUnavailable, Records, open_records
from shared.schemas import CycleStats, Decision, OomEvent, RequestRecord, WorkerInfo
from tests.test_db_helpers import (
    DbTarget,
    TcpProxy,
    cycle,
    db,
    decision,
    oom,
    pg_db,
    pg_proxy,
    request_record,
    telemetry,
    url_via_port,
    worker,
)

__all__ = ["db", "pg_db", "pg_proxy"]  # fixtures used here by name


@pytest.fixture
def records(db: DbTarget) -> Iterator[Records]:
    with db.open() as opened:
        yield opened


def test_cycles_requests_oom_round_trip(records: Records) -> None:
    items = [cycle(100.0), cycle(101.0, "w1", gpu_index=None, latency_p95_s=None)]
    records.add_cycles(items)
    records.add_requests([request_record(102.0)])
    records.add_oom_events([oom(103.0)])
    assert [CycleStats.model_validate(r) for r in records.fetch("cycles")] == items
    (req,) = records.fetch("requests")
    assert req["ts"] == 102.0 and req["finished_at"] == 102.0 and req["first_token_at"] == 101.6
    (event,) = records.fetch("oom_events")
    assert OomEvent.model_validate(event) == oom(103.0)
    assert event["recovered"] is True and isinstance(event["id"], int)


def test_request_round_trip_keeps_every_field(records: Records) -> None:
    original = request_record(50.0, request_id="req-1")
    records.add_requests([original])
    (row,) = records.fetch("requests")
    assert RequestRecord.model_validate(row) == original


def test_decision_round_trip_with_flat_columns(records: Records) -> None:
    original = decision(200.0)
    records.add_decisions([original])
    (row,) = records.fetch("decisions")
    assert Decision.model_validate(row) == original
    assert row["before"]["batch_size"] == 16 and row["inputs"]["memory_frac"] == 0.91
    flat = {k: row[k] for k in row if k.endswith(("_before", "_after"))}
    assert flat == {
        "batch_size_before": 16,
        "batch_size_after": 8,
        "precision_after": "fp16",
        "max_seq_len_after": 1024,
        "version_after": 5,
    }


def test_telemetry_one_row_per_gpu_and_one_without_gpu(records: Records) -> None:
    assert records.add_telemetry([telemetry(300.0, gpus=2), telemetry(301.0, gpus=0)]) == 3
    rows = records.fetch("telemetry")
    assert [(r["ts"], r["gpu_index"], r["gpu_name"]) for r in rows] == [
        (300.0, 0, "H100-0"),
        (300.0, 1, "H100-1"),
        (301.0, None, None),
    ]
    assert rows[1]["memory_used_bytes"] == 11 << 30 and rows[1]["power_w"] == 301.0
    assert rows[2]["memory_total_bytes"] is None
    assert rows[2]["host_memory_total_bytes"] == 128 << 30 and rows[2]["cpu_pct"] == 37.5
    assert rows[2]["note"] == "no GPU: host metrics only"


def test_workers_upsert_replaces_the_row(records: Records) -> None:
    records.upsert_worker(worker("w0", pid=1, started_at=10.0))
    records.upsert_worker(worker("w1", pid=2, started_at=5.0))
    records.upsert_worker(worker("w0", pid=3, started_at=20.0))
    assert records.workers() == [worker("w1", 2, 5.0), worker("w0", 3, 20.0)]
    assert [type(w) for w in records.workers()] == [WorkerInfo, WorkerInfo]


def test_duplicate_request_ids_are_ignored(records: Records) -> None:
    first = request_record(10.0, request_id="same")
    records.add_requests([first])
    records.add_requests([request_record(11.0, request_id="same")])
    assert [r["ts"] for r in records.fetch("requests")] == [10.0]


def test_fetch_filters(records: Records) -> None:
    records.add_cycles([cycle(100.0 + i, f"w{i % 2}") for i in range(10)])
    ts = lambda rows: [r["ts"] for r in rows]  # noqa: E731
    assert ts(records.fetch("cycles")) == [100.0 + i for i in range(10)]
    assert ts(records.fetch("cycles", since=105.0)) == [105.0, 106.0, 107.0, 108.0, 109.0]
    assert ts(records.fetch("cycles", until=102.0)) == [100.0, 101.0]
    assert ts(records.fetch("cycles", since=102.0, until=106.0, worker_id="w1")) == [103.0, 105.0]
    # limit keeps the latest rows, still oldest first
    assert ts(records.fetch("cycles", limit=3)) == [107.0, 108.0, 109.0]
    assert ts(records.fetch("cycles", worker_id="w0", until=107.0, limit=2)) == [104.0, 106.0]
    assert records.fetch("cycles", worker_id="nobody") == []


def test_bad_arguments_are_value_errors(records: Records) -> None:
    with pytest.raises(ValueError, match="unknown table 'users'"):
        records.fetch("users")
    with pytest.raises(ValueError, match="unknown table"):
        records.fetch("cycles; DROP TABLE cycles")
    with pytest.raises(ValueError, match="no worker_id"):
        records.fetch("telemetry", worker_id="w0")
    with pytest.raises(ValueError, match="limit"):
        records.fetch("cycles", limit=0)
    with pytest.raises(TypeError, match="CycleStats"):
        records.add_cycles([worker()])  # type: ignore[list-item]
    assert records.fetch("cycles") == []


def test_prune_deletes_old_rows_of_time_series_tables(records: Records) -> None:
    for ts in (10.0, 20.0, 30.0):
        records.add_cycles([cycle(ts)])
        records.add_requests([request_record(ts)])
        records.add_decisions([decision(ts)])
        records.add_oom_events([oom(ts)])
        records.add_telemetry([telemetry(ts, gpus=2)])
    records.upsert_worker(worker(started_at=1.0))
    # 2 rows of each of 4 tables + 2 samples x 2 GPUs
    assert records.prune(25.0) == 12
    for name in ("cycles", "requests", "decisions", "oom_events", "telemetry"):
        assert {r["ts"] for r in records.fetch(name)} == {30.0}, name
    assert len(records.workers()) == 1
    assert records.prune(25.0) == 0


def test_reopening_is_idempotent_and_keeps_data(db: DbTarget) -> None:
    with db.open() as first:
        first.add_cycles([cycle(1.0)])
    with db.open() as second:
        assert [r["ts"] for r in second.fetch("cycles")] == [1.0]
        assert second.ping()


def test_one_writer_and_readers_in_threads(records: Records) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                rows = records.fetch("cycles", limit=5)
                assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for i in range(40):
        records.add_cycles([cycle(float(i)), cycle(i + 0.5)])
    done.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert len(records.fetch("cycles")) == 80


def test_tables_have_indexes_on_ts_and_worker_id(db: DbTarget, records: Records) -> None:
    if db.kind == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'index'"
    else:
        query = f"SELECT indexname AS name FROM pg_indexes WHERE schemaname = '{db.schema}'"
    names = {row["name"] for row in records.backend.query(records._conn, query, [])}
    for table in TABLES.values():
        assert f"ix_{table.name}_ts" in names
        assert (f"ix_{table.name}_worker_id" in names) == table.has_column("worker_id")


def test_default_sqlite_url_creates_dir_and_uses_wal(tmp_path: Path) -> None:
    settings = CommonSettings(data_dir=tmp_path / "nested" / "data")
    url = settings.resolved_database_url()
    with open_records(url) as records:
        records.add_cycles([cycle(1.0)])
    path = tmp_path / "nested" / "data" / "aegis.db"
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM cycles").fetchone()[0] == 1


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://", "redis://127.0.0.1:6379/0", ""])
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        open_records(url)


def test_schema_name_is_validated(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        open_records(postgres_url, schema="x; DROP SCHEMA public")


def test_postgres_down_then_back(postgres_url: str, pg_proxy: TcpProxy, pg_db: DbTarget) -> None:
    """A real outage: open fails fast, calls fail while down, the store reconnects after."""
    db = pg_db
    url = url_via_port(postgres_url, pg_proxy.port)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        open_records(url, schema=db.schema)
    assert time.monotonic() - started < 3.0
    pg_proxy.set_up(True)
    with open_records(url, schema=db.schema, timeout_s=2.0) as records:
        records.add_cycles([cycle(1.0)])
        pg_proxy.set_up(False)
        assert not records.ping()
        with pytest.raises(DatabaseUnavailable):
            records.add_cycles([cycle(2.0)])
        pg_proxy.set_up(True)
        assert records.ping()
        records.add_cycles([cycle(3.0)])
        assert [r["ts"] for r in records.fetch("cycles")] == [1.0, 3.0]


def test_new_fields_become_new_columns_on_open(db: DbTarget) -> None:
    """A table from an older schema (a column short) gains the column when opened."""
    with db.open() as old:
        with old._connection() as conn, old.backend.transaction(conn):
            conn.execute('ALTER TABLE "cycles" DROP COLUMN "queue_depth"')
        with old._connection() as conn:
            assert "queue_depth" not in old.backend.columns_of(conn, "cycles")
    with db.open() as new:
        new.add_cycles([cycle(1.0, queue_depth=7)])
        assert [r["queue_depth"] for r in new.fetch("cycles")] == [7]


def test_concurrent_opens_of_a_fresh_database(db: DbTarget) -> None:
    """Services start together: creating the tables at once must not fail."""
    errors: list[BaseException] = []

    def open_once() -> None:
        try:
            db.open().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_reader_that_does_not_create_sees_empty_tables_until_a_writer_makes_them(
    backend: str, tmp_path, postgres_url: str
) -> None:
    if backend == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'ro.db'}", None
    else:
        url, schema = postgres_url, f"ro_{uuid.uuid4().hex[:8]}"
    reader = open_records(url, schema=schema, create=False)
    try:
        assert reader.fetch("cycles") == [] and reader.workers() == []
        writer = open_records(url, schema=schema)
        writer.add_cycles([cycle(5.0, "late")])
        assert [row["worker_id"] for row in reader.fetch("cycles")] == ["late"]
        writer.close()
    finally:
        reader.close()
        if schema:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
