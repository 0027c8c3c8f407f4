"""RecordWriter against real databases, including real outages (a Postgres behind a
switchable TCP proxy, a SQLite file locked by another connection)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from shared.db import RecordWriter, open_records
from shared.schemas import ControlSettings, OomEvent
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
    wait_for,
    worker,
)

__all__ = ["db", "pg_db", "pg_proxy"]  # fixtures used here by name

FAST: dict[str, Any] = dict(flush_interval_s=0.05, retry_initial_s=0.05, retry_max_s=0.2)


def mixed(n: int, start: float = 1000.0) -> list[BaseModel]:
    """``n`` records cycling through every record type, distinct timestamps."""
    makers: list[Callable[[float], BaseModel]] = [
        cycle,
        request_record,
        decision,
        oom,
        lambda ts: telemetry(ts, gpus=1),
    ]
    return [makers[i % len(makers)](start + i) for i in range(n)]


def counts(target: DbTarget) -> dict[str, int]:
    with target.open() as records:
        return {
            name: len(records.fetch(name))
            for name in ("cycles", "requests", "decisions", "oom_events", "telemetry")
        }


def expected_counts(n: int) -> dict[str, int]:
    names = ["cycles", "requests", "decisions", "oom_events", "telemetry"]
    return {name: len(range(i, n, len(names))) for i, name in enumerate(names)}


@pytest.fixture
def sqlite_target(tmp_path: Path) -> DbTarget:
    return DbTarget("sqlite", f"sqlite:///{tmp_path / 'db' / 'aegis.db'}")


def test_writes_every_type_and_flush_waits(db: DbTarget, tmp_path: Path) -> None:
    items = [*mixed(23), worker("w9")]
    with RecordWriter(db.opener(), spill_dir=tmp_path / "spill", **FAST) as writer:
        writer.submit_many(items)
        assert writer.flush(10.0)
        assert writer.pending == 0
        assert writer.stats.written == 24
    assert counts(db) == expected_counts(23)
    with db.open() as records:
        assert [w.worker_id for w in records.workers()] == ["w9"]


def test_batches_by_size_or_interval(db: DbTarget) -> None:
    """A full batch is written at once; a partial one waits for the interval or flush."""
    writer = RecordWriter(db.opener(), batch_size=10, flush_interval_s=30.0)
    try:
        with db.open() as records:
            writer.submit_many(cycle(float(i)) for i in range(10))
            assert wait_for(lambda: len(records.fetch("cycles")) == 10, 5.0)
            writer.submit_many(cycle(float(i)) for i in range(10, 13))
            time.sleep(0.3)
            assert len(records.fetch("cycles")) == 10  # partial batch still waiting
            assert writer.flush(5.0)
            assert len(records.fetch("cycles")) == 13
    finally:
        writer.close()


def test_submit_never_touches_the_database(postgres_url: str, pg_proxy: TcpProxy) -> None:
    """With the database down, submitting many records returns at once."""
    writer = RecordWriter(url_via_port(postgres_url, pg_proxy.port), **FAST)
    try:
        started = time.monotonic()
        writer.submit_many(cycle(float(i)) for i in range(2000))
        assert time.monotonic() - started < 1.0
        assert not writer.flush(0.2)
        assert writer.pending == 2000
    finally:
        writer.close(2.0)


def test_postgres_outage_loses_nothing(
    postgres_url: str,
    pg_proxy: TcpProxy,
    pg_db: DbTarget,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down at start, up, down mid-run with a buffer overflowing to disk, then up."""
    url = url_via_port(postgres_url, pg_proxy.port)
    spill = tmp_path / "spill"
    writer = RecordWriter(
        pg_db.opener(url, timeout_s=2.0), spill_dir=spill, batch_size=5, max_buffer=20, **FAST
    )
    try:
        with caplog.at_level(logging.WARNING, logger="shared.db.writer"):
            writer.submit_many(mixed(7, start=0.0))
            assert not writer.flush(0.3)  # the database never answered yet
            pg_proxy.set_up(True)
            assert writer.flush(10.0)
            assert counts(pg_db) == expected_counts(7)

            pg_proxy.set_up(False)  # cuts the writer's live connection
            writer.submit_many(mixed(50, start=100.0))
            assert wait_for(lambda: list(spill.glob("*.jsonl")) != [], 5.0)
            assert not writer.flush(0.3)
            pg_proxy.set_up(True)
            assert writer.flush(10.0)
        outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_warnings) == 2  # one per outage, not one per row or retry
    finally:
        writer.close()
    assert counts(pg_db) == {k: v + expected_counts(50)[k] for k, v in expected_counts(7).items()}
    assert list(spill.glob("*.jsonl")) == []
    assert writer.stats.spilled > 0 and writer.stats.outages == 2 and writer.stats.dropped == 0


def test_sqlite_locked_database_loses_nothing(sqlite_target: DbTarget, tmp_path: Path) -> None:
    """Another connection holds the write lock: writes fail (busy) until it lets go."""
    open_records(sqlite_target.url).close()  # tables exist
    path = sqlite_target.url.removeprefix("sqlite://")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    spill = tmp_path / "spill"
    writer = RecordWriter(
        sqlite_target.opener(timeout_s=0.05), spill_dir=spill, batch_size=5, max_buffer=10, **FAST
    )
    try:
        writer.submit_many(mixed(30))
        assert wait_for(lambda: list(spill.glob("*.jsonl")) != [], 5.0)
        assert not writer.flush(0.3)
        assert blocker.execute("SELECT COUNT(*) FROM cycles").fetchone()[0] == 0
        blocker.execute("ROLLBACK")
        assert writer.flush(10.0)
    finally:
        writer.close()
        blocker.close()
    assert counts(sqlite_target) == expected_counts(30)
    assert list(spill.glob("*.jsonl")) == []


def test_close_during_outage_spills_and_next_writer_replays(
    postgres_url: str, pg_proxy: TcpProxy, pg_db: DbTarget, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    down = RecordWriter(
        pg_db.opener(url_via_port(postgres_url, pg_proxy.port)), spill_dir=spill, **FAST
    )
    down.submit_many(mixed(12))
    down.close(5.0)
    assert len(list(spill.glob("*.jsonl"))) == 1
    with pytest.raises(RuntimeError, match="closed"):
        down.submit(cycle(1.0))

    with RecordWriter(pg_db.opener(), spill_dir=spill, **FAST) as up:
        assert up.flush(10.0)
    assert counts(pg_db) == expected_counts(12)
    assert list(spill.glob("*.jsonl")) == []


def test_bad_rows_are_dropped_alone(db: DbTarget) -> None:
    """A value the database refuses (beyond 64-bit) costs that row only."""
    good = [cycle(float(i)) for i in range(4)]
    bad = cycle(2.5, memory_peak_bytes=2**70)
    with RecordWriter(db.opener(), **FAST) as writer:
        writer.submit_many([*good[:2], bad, *good[2:]])
        assert writer.flush(10.0)
        assert writer.stats.dropped == 1 and writer.stats.written == 4
    with db.open() as records:
        assert [r["ts"] for r in records.fetch("cycles")] == [0.0, 1.0, 2.0, 3.0]


def test_prunes_by_retention(db: DbTarget) -> None:
    now = time.time()
    with db.open() as records:
        records.add_cycles([cycle(now - 7200), cycle(now - 60)])
        records.add_telemetry([telemetry(now - 7200, gpus=0)])
        records.upsert_worker(worker(started_at=now - 7200))
    with RecordWriter(db.opener(), retention_hours=1.0, prune_every_s=0.05, **FAST) as writer:
        with db.open() as records:
            assert wait_for(lambda: len(records.fetch("cycles")) == 1, 5.0)
            assert records.fetch("telemetry") == []
            assert len(records.workers()) == 1
        assert writer.flush(5.0)


def test_rejects_what_it_cannot_write(sqlite_target: DbTarget) -> None:
    with pytest.raises(ValueError):
        RecordWriter("mysql://nowhere/db")
    with RecordWriter(sqlite_target.url, **FAST) as writer:
        with pytest.raises(TypeError, match="ControlSettings"):
            writer.submit(ControlSettings())
        assert writer.flush(1.0)


def test_replays_spill_files_left_behind_skipping_garbage(
    sqlite_target: DbTarget, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    good = {"table": "oom_events", "item": oom(5.0).model_dump(mode="json")}
    lines = [json.dumps(good), "{not json", json.dumps({"table": "nope", "item": {}})]
    (spill / "records-1-dead.jsonl").write_text("\n".join(lines) + "\n")
    with open_records(sqlite_target.url) as records:
        with RecordWriter(records, spill_dir=spill, **FAST) as writer:
            assert writer.flush(5.0)
            assert writer.stats.dropped == 2
        assert [OomEvent.model_validate(r) for r in records.fetch("oom_events")] == [oom(5.0)]
        assert records._conn is not None  # a Records passed in is not closed by the writer
    assert list(spill.iterdir()) == []


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = {t for t in threading.enumerate() if t.name == "record-writer"}
    yield
    assert wait_for(
        lambda: {t for t in threading.enumerate() if t.name == "record-writer"} <= before, 5.0
    )
