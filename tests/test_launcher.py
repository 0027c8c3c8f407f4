"""``aegis run`` (the README's run command) and its Redis bootstrap, as real processes."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest
import redis

from shared.redis_server import RedisUnavailable, answers, ensure_redis
from tests.processes import Service, free_port, http_ok, wait_for

pytestmark = pytest.mark.slow


def test_a_local_redis_server_is_started_when_none_answers(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not answers(url)
    process = ensure_redis(url, tmp_path / "redis")
    try:
        assert process is not None and answers(url)
        assert redis.Redis.from_url(url).set("k", "v")
    finally:
        assert process is not None
        process.terminate()
        process.wait(10)


def test_a_bundled_redis_server_is_preferred(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    installed = shutil.which("redis-server")
    assert installed is not None, "the tests need Debian's redis-server"
    shutil.copy(Path(installed).resolve(), bundle / "redis-server")
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = ensure_redis(url, tmp_path / "data", bundled=bundle)
    try:
        assert process is not None and process.args[0] == str(bundle / "redis-server")
        assert answers(url)
    finally:
        assert process is not None
        process.terminate()
        process.wait(10)


def test_a_remote_redis_that_does_not_answer_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RedisUnavailable, match="AEGIS_REDIS_URL"):
        ensure_redis("redis://redis.invalid:6379/0", tmp_path)


def test_aegis_run_serves_a_completion_and_stops_on_sigterm(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**aegis_env, "AEGIS_MODEL": "synthetic:tiny", "AEGIS_DEVICE": "cpu",
           "AEGIS_GATEWAY_PORT": str(port), "AEGIS_WORKER_METRICS_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "aegis_cli", "run", "--only", "gateway", "worker"]
    launcher = Service("launcher", argv, env, tmp_path)
    try:
        wait_for(http_ok(f"http://127.0.0.1:{port}/ready"), 120, "system ready", launcher)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "m", "prompt": "hello", "max_tokens": 4}, timeout=60,
        )  # fmt: skip
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        launcher.process.send_signal(signal.SIGTERM)
        assert launcher.process.wait(60) == 0, launcher.log()
    log = launcher.log()
    assert "received SIGTERM: stopping services" in log
    assert "worker" in log and "stopped after" in log  # the worker finished cleanly
    assert not http_ok(f"http://127.0.0.1:{port}/health")()
