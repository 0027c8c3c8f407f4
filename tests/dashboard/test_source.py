"""The dashboard's database side: URL handling, snapshots, filtering (real SQLite)."""

from __future__ import annotations

import time
from pathlib import Path

from services.dashboard import source
from services.dashboard.data import Filters
from shared.db import open_records
from tests.dashboard.seed import seed


def test_sqlite_path_and_missing_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert source.sqlite_path(url) == tmp_path / "a.db"
    assert source.database_missing(url)
    assert source.sqlite_path("sqlite:///:memory:") is None
    assert source.sqlite_path("postgresql://u@h/db") is None
    assert not source.database_missing("postgresql://u@h/db")


def test_redact_hides_only_the_password() -> None:
    assert (
        source.redact("postgresql://app:s3cret@db:5432/aegis")
        == "postgresql://app:***@db:5432/aegis"
    )
    assert source.redact("postgresql://app@db/aegis") == "postgresql://app@db/aegis"


def test_connect_refuses_to_create_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    try:
        source.connect(f"sqlite:///{path}")
    except FileNotFoundError as exc:
        assert str(path) in str(exc)
    else:
        raise AssertionError("connect created a database")
    assert not path.exists()


def test_snapshot_window_and_filters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    now = time.time()
    with open_records(url) as records:
        seed(records, now)
        snapshot = source.load_snapshot(records, now - 900, max_rows=1000)
        everything = source.load_snapshot(records, None, max_rows=1000)
        latest = source.load_snapshot(records, None, max_rows=5)
    assert len(snapshot.cycles) == 60 and len(everything.cycles) == 61
    assert len(snapshot.oom_events) == 1 and len(everything.oom_events) == 2
    assert len(latest.cycles) == 5 and latest.cycles["ts"].is_monotonic_increasing
    assert latest.cycles["ts"].iloc[-1] == snapshot.cycles["ts"].iloc[-1]
    assert [w.worker_id for w in snapshot.workers] == ["w1", "w2"]
    assert not snapshot.empty and source.empty_snapshot().empty

    w2 = source.filter_snapshot(snapshot, Filters(workers=("w2",)))
    assert set(w2.cycles["worker_id"]) == {"w2"} and w2.oom_events.empty
    assert set(w2.telemetry["gpu_index"]) == {1}  # the GPU w2 runs on
    assert [w.worker_id for w in w2.workers] == ["w2"]
    gpu0 = source.filter_snapshot(snapshot, Filters(gpus=(0,)))
    assert set(gpu0.cycles["worker_id"]) == {"w1"} and set(gpu0.telemetry["gpu_index"]) == {0}
    assert len(gpu0.decisions) == 3  # decisions carry no GPU: only a worker filter applies
    assert len(snapshot.requests) == 9 and len(everything.requests) == 10
    assert set(w2.requests["worker_id"]) == {"w2"} and len(w2.requests) == 4
    # Requests carry no GPU: the GPU filter keeps those of the worker on that GPU.
    assert set(gpu0.requests["worker_id"]) == {"w1"} and len(gpu0.requests) == 5
    nobody = source.filter_snapshot(snapshot, Filters(workers=("w2",), gpus=(0,)))
    assert nobody.requests.empty


def test_module_command_uses_settings(monkeypatch) -> None:
    from services.dashboard.__main__ import APP, command
    from services.dashboard.config import DashboardSettings

    monkeypatch.setenv("AEGIS_DASHBOARD_PORT", "9123")
    argv = command(DashboardSettings())
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4] == str(APP) and APP.exists()
    assert argv[argv.index("--server.port") + 1] == "9123"
    assert argv[argv.index("--server.headless") + 1] == "true"
