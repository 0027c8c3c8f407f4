"""End to end: ``streamlit run`` on a seeded SQLite file, opened in headless Chromium.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``); the
test fails, rather than skips, without it. Leaves a screenshot at
``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Page, sync_playwright

from shared.db import open_records
from shared.keys import Keys
from shared.schemas import CycleStats
from tests.dashboard.seed import DEAD_ERRORS, EXPECTED, REASONS, seed, seed_dead_letters
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "services" / "dashboard" / "app.py"
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
CHART_SECTIONS = (
    "tokens",
    "running",
    "kv",
    "preemptions",
    "ttft",
    "itl",
    "prefill",
    "batch",
    "memory",
    "worker-memory",
    "utilisation",
    "latency",
    "queue",
)
# Colours of the event marks (services/dashboard/charts.py).
DECISION_STROKE = "#7f7f7f"
OOM_STROKE = "#d62728"
TIMEOUT_MS = 20_000


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until Streamlit's health endpoint answers; fails with the server log otherwise."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not become healthy in 30 s:\n{log.read_text()}")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    with open_records(url) as records:
        seed(records, time.time())
    return url


@pytest.fixture
def dashboard(
    tmp_path: Path, db_url: str, redis_client: redis.Redis, keys: Keys, aegis_env: dict[str, str]
) -> Iterator[str]:
    """The dashboard served by a real ``streamlit run`` on a free port; its base URL."""
    seed_dead_letters(redis_client, keys, time.time())
    port = free_port()
    env = {**os.environ, **aegis_env, "AEGIS_DATABASE_URL": db_url, "AEGIS_REFRESH_S": "1"}
    log = tmp_path / "streamlit.log"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chart_strokes(page: Page, section: str) -> list[str]:
    """Stroke colours of the rules drawn in one chart section (decisions, OOMs, thresholds)."""
    chart = page.locator(f'.st-key-section-{section} [data-testid="stVegaLiteChart"] svg.marks')
    strokes: list[str] = chart.evaluate(
        "svg => [...svg.querySelectorAll('g.mark-rule > *')].map(e => e.getAttribute('stroke'))"
    )
    return strokes


def assert_charts(page: Page) -> None:
    """Every chart section holds a drawn Vega-Lite chart with lines and event marks."""
    for section in CHART_SECTIONS:
        lines = (
            f'.st-key-section-{section} [data-testid="stVegaLiteChart"] svg.marks g.mark-line path'
        )
        page.wait_for_selector(lines, state="attached", timeout=TIMEOUT_MS)
        strokes = chart_strokes(page, section)
        assert strokes.count(DECISION_STROKE) == 3, (section, strokes)
        assert strokes.count(OOM_STROKE) == 1, (section, strokes)


def assert_tables(page: Page) -> None:
    """The decisions and OOM tables are drawn and carry the seeded rows."""
    decisions = page.locator('.st-key-section-decisions [data-testid="stDataFrame"]')
    decisions.locator("canvas").first.wait_for(timeout=TIMEOUT_MS)
    text = decisions.locator("table").first.inner_text()
    for reason in REASONS.values():
        assert reason in text
    oom_text = page.locator('.st-key-section-ooms [data-testid="stDataFrame"] table').inner_text()
    assert "CUDA out of memory" in oom_text
    letters = page.locator('.st-key-section-dead-letters [data-testid="stDataFrame"] table')
    letters_text = letters.inner_text()
    assert all(error in letters_text for error in DEAD_ERRORS.values())


def metric_value(page: Page, label: str) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
    return metric.locator('[data-testid="stMetricValue"]').inner_text()


def test_dashboard_in_chromium(dashboard: str, db_url: str) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium)"
        )
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 3300})
            page.goto(dashboard, wait_until="domcontentloaded")
            assert_charts(page)
            assert_tables(page)
            banner = page.locator('[data-testid="stAlert"]').filter(has_text="random weights")
            assert "w1" in banner.inner_text()
            for label in ("Tokens/s now", "KV cache used", "Running / waiting", "Dead letters"):
                assert metric_value(page, label) == EXPECTED[label], label
            page.wait_for_timeout(500)  # let the canvases finish painting
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # Live refresh: a new cycle shows up without reloading the page.
            with open_records(db_url) as records:
                records.add_cycles([new_cycle()])
            page.wait_for_function(
                """() => [...document.querySelectorAll('[data-testid="stMetricValue"]')]
                        .some(e => e.innerText.trim() === '380.0')""",
                timeout=TIMEOUT_MS,
            )
        finally:
            browser.close()


def new_cycle() -> CycleStats:
    """A cycle of w1 newer than the seed: total throughput becomes 300 + 80 (w2)."""
    return CycleStats(
        worker_id="w1",
        gpu_index=0,
        settings_version=3,
        batch_size=16,
        max_prompt_len=64,
        mean_prompt_len=40.0,
        max_new_tokens=32,
        precision="bf16",
        max_seq_len=2048,
        tokens_generated=512,
        tokens_per_s=300.0,
        latency_s=1.0,
        padding_ratio=0.1,
    )
