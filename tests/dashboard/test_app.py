"""The Streamlit app, run headless by ``AppTest`` on seeded SQLite and Postgres databases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from streamlit.testing.v1 import AppTest

from shared.db import open_records
from tests.dashboard.seed import EXPECTED, REASONS, seed

APP = str(Path(__file__).resolve().parents[2] / "services" / "dashboard" / "app.py")
CHART_SECTIONS = ("tokens", "batch", "memory", "utilisation", "latency", "queue")


def run_app(monkeypatch: pytest.MonkeyPatch, url: str) -> AppTest:
    """The app run once against ``url``; no uncaught exception allowed."""
    monkeypatch.setenv("AEGIS_DATABASE_URL", url)
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def subheaders(app: AppTest) -> list[str]:
    return [header.value for header in app.subheader]


def assert_seeded_page(app: AppTest) -> None:
    """What the seeded history must show in the default 15 minute window."""
    assert metrics(app) == EXPECTED
    assert [table for table in app.dataframe if "reason" in table.value.columns]
    decisions = next(t.value for t in app.dataframe if "reason" in t.value.columns)
    assert set(decisions["reason"]) == set(REASONS.values())
    assert list(decisions["action"]) == ["halve", "precision", "grow"]
    assert "batch 32->16" in list(decisions["change"])
    ooms = next(t.value for t in app.dataframe if "message" in t.value.columns)
    assert list(ooms["message"]) == ["CUDA out of memory"]
    warnings = [w.value for w in app.warning]
    assert any("random weights: text is meaningless" in w and "w1" in w for w in warnings)
    assert not any("No GPU" in w for w in warnings)
    for title in ("Tokens/s", "Batch size", "GPU memory", "GPU utilisation %", "Latency p50/p95"):
        assert title in subheaders(app)
    assert {"Queue depth", "Decisions", "OOM events"} <= set(subheaders(app))
    assert not app.error and not app.info


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    with open_records(url) as records:
        seed(records, time.time())
    return url


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A seeded Postgres schema of its own; the app reaches it through search_path."""
    schema = f"dash_{uuid.uuid4().hex[:10]}"
    with open_records(postgres_url, schema=schema) as records:
        seed(records, time.time())
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_sqlite_metrics_tables_and_banner(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    assert_seeded_page(run_app(monkeypatch, sqlite_url))


def test_postgres_metrics_tables_and_banner(
    monkeypatch: pytest.MonkeyPatch, pg_schema_url: str
) -> None:
    assert_seeded_page(run_app(monkeypatch, pg_schema_url))


def test_window_all_counts_old_oom(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    app = run_app(monkeypatch, sqlite_url)
    app.selectbox(key="window").set_value("all").run()
    assert metrics(app)["OOMs in window"] == "2"
    ooms = next(t.value for t in app.dataframe if "message" in t.value.columns)
    assert list(ooms["message"]) == ["CUDA out of memory", "old OOM"]


def test_worker_filter_shows_one_worker(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    app = run_app(monkeypatch, sqlite_url)
    assert app.multiselect(key="workers").options == ["w1", "w2"]
    app.multiselect(key="workers").set_value(["w2"]).run()
    shown = metrics(app)
    assert (shown["Tokens/s now"], shown["Batch size"], shown["Precision"]) == ("80.0", "8", "fp16")
    assert shown["OOMs in window"] == "0"
    decisions = next(t.value for t in app.dataframe if "reason" in t.value.columns)
    assert list(decisions["reason"]) == [REASONS["precision"]]
    # w2 runs a real model: the synthetic banner is about w1 only.
    assert not any("random weights" in w.value for w in app.warning)


def test_empty_database_says_no_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_records(url).close()
    app = run_app(monkeypatch, url)
    assert any(info.value.startswith("No data yet") for info in app.info)
    assert not app.metric and not app.error


def test_missing_sqlite_file_is_not_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "nowhere" / "aegis.db"
    app = run_app(monkeypatch, f"sqlite:///{path}")
    assert any(info.value.startswith("No data yet") for info in app.info)
    assert not path.exists() and not path.parent.exists()


def test_unreachable_database_shows_error(monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(monkeypatch, "postgresql://postgres@127.0.0.1:1/nothing")
    assert any("Database unreachable" in error.value for error in app.error)
    assert app.title[0].value == "AEGIS Runtime"


def test_bad_database_url_shows_error(monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(monkeypatch, "mysql://root@localhost/aegis")
    assert any("Bad database URL" in error.value for error in app.error)


def test_cpu_only_host_gets_no_gpu_banner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from shared.schemas import TelemetrySample, WorkerInfo

    url = f"sqlite:///{tmp_path / 'cpu.db'}"
    with open_records(url) as records:
        records.upsert_worker(
            WorkerInfo(
                worker_id="c1",
                host="box",
                pid=1,
                device="cpu",
                model="synthetic:tiny",
                synthetic=True,
            )
        )
        records.add_telemetry(
            [
                TelemetrySample(
                    host="box",
                    gpu="none",
                    host_memory_used_bytes=2 << 30,
                    host_memory_total_bytes=8 << 30,
                    cpu_pct=50.0,
                )
            ]
        )
    app = run_app(monkeypatch, url)
    warnings = [w.value for w in app.warning]
    assert any("No GPU present" in w and "worker c1" in w and "host box" in w for w in warnings)
    assert any("random weights" in w for w in warnings)
    assert "Host memory (no GPU)" in subheaders(app)


def test_gpu_filter_and_short_window(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    app = run_app(monkeypatch, sqlite_url)
    assert app.multiselect(key="gpus").options == ["0", "1"]
    app.multiselect(key="gpus").set_value([1]).run()
    assert metrics(app)["Tokens/s now"] == "80.0"
    assert "GPU memory" in subheaders(app)
    app.multiselect(key="gpus").set_value([]).run()
    app.selectbox(key="window").set_value("5 min").run()
    # 5 minutes hold the last ~15 cycles of each worker and one decision (w1 halve).
    decisions = next(t.value for t in app.dataframe if "reason" in t.value.columns)
    assert list(decisions["reason"]) == [REASONS["halve"]]
