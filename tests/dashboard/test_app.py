"""The Streamlit app, run headless by ``AppTest`` on seeded SQLite and Postgres databases."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
import redis
from psycopg import sql
from streamlit.testing.v1 import AppTest

from shared.db import Records, open_records
from shared.keys import Keys
from tests.dashboard.seed import DEAD_ERRORS, EXPECTED, REASONS, seed, seed_dead_letters

APP = str(Path(__file__).resolve().parents[2] / "services" / "dashboard" / "app.py")
CORE_TITLES = (
    "Running / waiting sequences",
    "KV cache used %",
    "Preemptions per window",
    "Time to first token p50/p95",
    "Inter-token latency p50/p95",
    "Prefill / decode tokens per window",
    "KV pool vs other processes' GPU memory",
)
OTHER_TITLES = (
    "Tokens/s",
    "Max running sequences",
    "GPU memory",
    "Worker memory: held / reserved",
    "GPU utilisation %",
    "Request latency p50/p95",
    "Queue depth",
)
# Columns an older version's cycles table lacks (added with the engine core).
CORE_COLUMNS = (
    "steps",
    "requests_finished",
    "running",
    "waiting",
    "kv_blocks_used",
    "kv_blocks_total",
    "kv_usage",
    "kv_pool_bytes",
    "preemptions",
    "prefill_tokens",
    "decode_tokens",
    "step_time_mean_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "itl_p50_s",
    "itl_p95_s",
    "max_batched_tokens",
)


@pytest.fixture(autouse=True)
def dead_letters(aegis_env: dict[str, str], redis_client: redis.Redis, keys: Keys) -> None:
    """Every app here reads the dead letters of its own key prefix (aegis_env sets it)."""
    seed_dead_letters(redis_client, keys, time.time())


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


def table_with(app: AppTest, column: str) -> pd.DataFrame:
    """The first table drawn with ``column``."""
    return next(t.value for t in app.dataframe if column in t.value.columns)


def captions(app: AppTest) -> list[str]:
    return [caption.value for caption in app.caption]


def chart(app: AppTest, y_title: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows and tooltip titles of the line layer of the chart whose y axis is ``y_title``."""
    for element in app.get("vega_lite_chart"):
        lines = json.loads(element.proto.spec)["layer"][0]
        if lines["encoding"]["y"].get("title") == y_title:
            name = lines["data"]["name"]
            data = next(d.data.data for d in element.proto.datasets if d.name == name)
            rows = pa.ipc.open_stream(data).read_all().to_pandas()
            tips = [tip.get("title", tip["field"]) for tip in lines["encoding"]["tooltip"]]
            return rows, tips
    raise AssertionError(f"no chart with y axis {y_title!r}")


def last(rows: pd.DataFrame, worker: str, column: str = "value", **where: str) -> object:
    """The latest ``column`` of ``worker`` (and of the rows matching ``where``)."""
    mask = rows["worker_id"] == worker
    for name, value in where.items():
        mask &= rows[name] == value
    return rows[mask].sort_values("time")[column].iloc[-1]


def assert_core_charts(app: AppTest) -> None:
    """The engine core's charts carry the seeded figures (see tests/dashboard/seed.py)."""
    kv, tips = chart(app, "% of KV blocks")
    assert {"blocks used", "blocks total", "pool GiB"} <= set(tips)
    assert last(kv, "w1", "pct") == 62.5 and last(kv, "w2", "pct") == 50.0
    assert (last(kv, "w1", "blocks_used"), last(kv, "w1", "blocks_total")) == (2560, 4096)
    assert last(kv, "w2", "pool_gib") == 1.0
    running, _ = chart(app, "sequences")
    assert (
        last(running, "w1", series="running") == 12 and last(running, "w1", series="waiting") == 3
    )
    preemptions, _ = chart(app, "preemptions")
    assert preemptions["value"].sum() == 6
    ttft, _ = chart(app, "TTFT s")
    assert last(ttft, "w2", series="p95") == 0.25 and last(ttft, "w2", series="p50") == 0.05
    itl, _ = chart(app, "inter-token s")
    assert last(itl, "w1", series="p95") == pytest.approx(0.02 + 0.029)
    phases, _ = chart(app, "tokens")
    assert (last(phases, "w1", series="prefill"), last(phases, "w1", series="decode")) == (129, 229)
    most_running, _ = chart(app, "max running")
    assert last(most_running, "w1") == 16
    tenants, _ = chart(app, "pool / other GiB")  # NVML used 30 GiB - 10 GiB reserved
    assert last(tenants, "w1", "gib", series="KV pool") == 2.0
    assert last(tenants, "w2", "gib", series="other processes") == 20.0
    memory, _ = chart(app, "worker GiB")
    assert (
        last(memory, "w1", "gib", series="held"),
        last(memory, "w2", "gib", series="reserved"),
    ) == (6.0, 10.0)


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
    assert set(CORE_TITLES + OTHER_TITLES) <= set(subheaders(app))
    assert {"Decisions", "OOM events", "Dead letters"} <= set(subheaders(app))
    assert "KV pool: w1: 4096 blocks, 2.00 GiB; w2: 2048 blocks, 1.00 GiB" in captions(app)
    assert not any("No engine-core statistics" in c for c in captions(app))
    assert_core_charts(app)
    letters = table_with(app, "deliveries")
    assert list(letters["error"]) == [DEAD_ERRORS["w2"], DEAD_ERRORS["w1"]]  # newest first
    assert "7 ever recorded; the latest of this window:" in captions(app)
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


def _mark(layer: dict) -> str | None:
    mark = layer.get("mark")
    return mark.get("type") if isinstance(mark, dict) else mark


def test_ttft_target_is_drawn_on_the_ttft_chart(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    def target_rules(app: AppTest) -> list[float]:
        for element in app.get("vega_lite_chart"):
            spec = json.loads(element.proto.spec)
            if spec["layer"][0]["encoding"]["y"].get("title") != "TTFT s":
                continue
            names = [
                lay["data"]["name"]
                for lay in spec["layer"]
                if _mark(lay) == "rule" and lay["encoding"].get("y", {}).get("field") == "value"
            ]
            tables = [pa.ipc.open_stream(d.data.data).read_all().to_pandas()
                      for d in element.proto.datasets if d.name in names]  # fmt: skip
            return [float(v) for t in tables for v in t["value"]]
        raise AssertionError("no TTFT chart")

    assert target_rules(run_app(monkeypatch, sqlite_url)) == []
    monkeypatch.setenv("AEGIS_TTFT_TARGET_MS", "200")
    assert target_rules(run_app(monkeypatch, sqlite_url)) == [0.2]


def test_window_all_counts_old_oom(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    app = run_app(monkeypatch, sqlite_url)
    app.selectbox(key="window").set_value("all").run()
    shown = metrics(app)
    assert (shown["OOMs in window"], shown["Preemptions in window"]) == ("2", "56")
    assert shown["Cancelled in window"] == "4"
    ooms = next(t.value for t in app.dataframe if "message" in t.value.columns)
    assert list(ooms["message"]) == ["CUDA out of memory", "old OOM"]
    assert list(table_with(app, "deliveries")["error"])[-1] == "old failure"


def test_worker_filter_shows_one_worker(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    app = run_app(monkeypatch, sqlite_url)
    assert app.multiselect(key="workers").options == ["w1", "w2"]
    app.multiselect(key="workers").set_value(["w2"]).run()
    shown = metrics(app)
    assert (shown["Tokens/s now"], shown["Precision"]) == ("80.0", "fp16")
    assert (shown["Running / waiting"], shown["KV cache used"]) == ("6 / 0", "50.0%")
    assert (shown["TTFT p95"], shown["Preemptions in window"]) == ("250 ms", "0")
    assert (shown["OOMs in window"], shown["Cancelled in window"]) == ("0", "2")
    assert list(table_with(app, "deliveries")["worker"]) == ["w2"]
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
    app.multiselect(key="gpus").set_value([0]).run()
    shown = metrics(app)
    assert (shown["Tokens/s now"], shown["KV cache used"]) == ("120.5", "62.5%")
    assert (shown["TTFT p95"], shown["Cancelled in window"]) == ("120 ms", "1")
    app.multiselect(key="gpus").set_value([1]).run()
    assert metrics(app)["Tokens/s now"] == "80.0"
    assert "GPU memory" in subheaders(app)
    app.multiselect(key="gpus").set_value([]).run()
    app.selectbox(key="window").set_value("5 min").run()
    # 5 minutes hold the last ~15 cycles of each worker and one decision (w1 halve).
    decisions = next(t.value for t in app.dataframe if "reason" in t.value.columns)
    assert list(decisions["reason"]) == [REASONS["halve"]]


def drop_core_columns(records: Records) -> None:
    """Make the cycles table look like an older version's: without the core's columns."""
    with records._connection() as conn, records.backend.transaction(conn, ddl=True):
        for column in CORE_COLUMNS:
            conn.execute(f'ALTER TABLE "cycles" DROP COLUMN "{column}"')


def assert_old_database_page(app: AppTest) -> None:
    """Cycles without the core's columns: "-" in their metrics, captions for their charts."""
    shown = metrics(app)
    assert shown["Tokens/s now"] == EXPECTED["Tokens/s now"]
    for label in ("Running / waiting", "KV cache used", "TTFT p95", "Preemptions in window"):
        assert shown[label] == "-", label
    assert captions(app).count("No engine-core statistics in this window.") == len(CORE_TITLES)
    assert set(CORE_TITLES + OTHER_TITLES) <= set(subheaders(app))
    assert not app.error


def test_sqlite_database_of_an_older_version(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    with open_records(sqlite_url, create=False) as records:
        drop_core_columns(records)
        assert "kv_usage" not in records.fetch("cycles", limit=1)[0]
    assert_old_database_page(run_app(monkeypatch, sqlite_url))


def test_postgres_database_of_an_older_version(
    monkeypatch: pytest.MonkeyPatch, pg_schema_url: str
) -> None:
    with open_records(pg_schema_url, create=False) as records:
        drop_core_columns(records)
    assert_old_database_page(run_app(monkeypatch, pg_schema_url))


def test_unreachable_redis_leaves_the_rest_of_the_page(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("AEGIS_REDIS_URL", "redis://127.0.0.1:1/0")
    app = run_app(monkeypatch, sqlite_url)
    shown = metrics(app)
    assert shown["Dead letters"] == "-" and shown["KV cache used"] == EXPECTED["KV cache used"]
    assert any("Dead letters unknown: Redis unreachable" in w.value for w in app.warning)
    assert not app.error
