"""``aegis run`` (the README's run command) and its Redis bootstrap, as real processes."""

from __future__ import annotations

import shutil
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import redis

from shared.control import ControlStore
from shared.keys import Keys
from shared.redis_server import RedisUnavailable, answers, ensure_redis
from shared.schemas import ControlSettings
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


def _launcher(env: dict[str, str], tmp_path: Path, *args: str) -> Service:
    argv = [sys.executable, "-m", "aegis_cli", "run", *args]
    return Service("launcher", argv, env, tmp_path)


def test_a_bad_setting_stops_the_launcher_with_pydantics_message(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**aegis_env, "AEGIS_BATCH_SIZE": "0", "AEGIS_GATEWAY_PORT": str(free_port())}
    launcher = _launcher(env, tmp_path, "--only", "gateway", "worker")
    assert launcher.process.wait(60) == 2
    log = launcher.log()
    assert "bad setting for worker: 1 validation error for WorkerSettings" in log
    assert "Input should be greater than or equal to 1" in log and "AEGIS_BATCH_SIZE" in log
    assert "started gateway" not in log  # nothing started, so nothing restarts forever


def test_a_bad_setting_of_the_launcher_itself_is_a_message_not_a_traceback(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    launcher = _launcher({**aegis_env, "AEGIS_LOG_LEVEL": "LOUD"}, tmp_path, "--only", "agent")
    assert launcher.process.wait(60) == 2
    log = launcher.log()
    assert "aegis run: bad setting: 1 validation error" in log and "log_level" in log
    assert "Traceback" not in log


def test_a_service_that_keeps_dying_at_start_stops_the_launcher(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # the gateway can never bind
        port = int(taken.getsockname()[1])
        env = {**aegis_env, "AEGIS_GATEWAY_PORT": str(port), "AEGIS_RESTART_LIMIT": "2"}
        launcher = _launcher(env, tmp_path, "--only", "gateway")
        assert launcher.process.wait(120) == 1, launcher.log()
    log = launcher.log()
    assert log.count("started gateway") == 2
    assert "gateway exited 2 times in a row within 60s of its start" in log
    assert "not restarting it, stopping every service" in log


def _heartbeats(client: redis.Redis, prefix: str) -> set[str]:
    head, tail = f"{prefix}:worker:", ":alive"
    return {k.decode().removeprefix(head).removesuffix(tail)
            for k in client.scan_iter(f"{head}*{tail}")}  # fmt: skip


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _free(port + 1):
            return port
    raise AssertionError("no two adjacent free ports")


def _free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def test_aegis_run_starts_n_workers_each_with_its_own_id_and_metrics_port(
    aegis_env: dict[str, str], redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    base = _two_free_ports()
    env = {**aegis_env, "AEGIS_MODEL": "synthetic:tiny", "AEGIS_DEVICE": "cpu",
           "AEGIS_WORKER_METRICS_PORT": str(base), "OMP_NUM_THREADS": "1"}  # fmt: skip
    launcher = _launcher(env, tmp_path, "--only", "worker", "--workers", "2")
    host = socket.gethostname()
    expected = {f"{host}-cpu-0", f"{host}-cpu-1"}
    try:
        wait_for(lambda: _heartbeats(redis_client, key_prefix) == expected, 120,
                 "two worker heartbeats", launcher)  # fmt: skip
        for port, worker_id in ((base, f"{host}-cpu-0"), (base + 1, f"{host}-cpu-1")):
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert f'worker="{worker_id}"' in metrics
    finally:
        launcher.process.send_signal(signal.SIGTERM)
        assert launcher.process.wait(60) == 0, launcher.log()
    assert launcher.log().count("stopped after") == 2


def test_a_second_worker_started_by_hand_does_not_collide(
    aegis_env: dict[str, str], redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    # As the README says to start one: no id, no port given.
    env = {**aegis_env, "AEGIS_MODEL": "synthetic:tiny", "AEGIS_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "services.worker"]
    first = Service("first", argv, env, tmp_path)
    second = None
    try:
        wait_for(lambda: len(_heartbeats(redis_client, key_prefix)) == 1, 120, "first", first)
        second = Service("second", argv, env, tmp_path)
        wait_for(lambda: len(_heartbeats(redis_client, key_prefix)) == 2, 120, "second", second)
        ids = _heartbeats(redis_client, key_prefix)
        ports = {int(i.rsplit("-", 1)[1]) for i in ids}
        assert len(ports) == 2  # each serves its own /metrics
        for port in ports:
            assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    finally:
        assert first.stop() == 0, first.log()
        if second is not None:
            assert second.stop() == 0, second.log()


def test_leftover_state_is_reported_and_fresh_clears_it(
    aegis_env: dict[str, str], redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    ControlStore(redis_client, keys).write("old-worker", ControlSettings(batch_size=64))
    launcher = _launcher(aegis_env, tmp_path, "--only", "agent")
    try:
        wait_for(lambda: "agent settings left for worker 'old-worker'" in launcher.log(), 60,
                 "the leftover warning", launcher)  # fmt: skip
        assert "`aegis run --fresh` starts from a clean Redis state" in launcher.log()
    finally:
        assert launcher.stop() == 0
    (tmp_path / "fresh").mkdir()
    fresh = _launcher(aegis_env, tmp_path / "fresh", "--only", "agent", "--fresh")
    try:
        wait_for(lambda: "--fresh: removed" in fresh.log(), 60, "--fresh", fresh)
        assert redis_client.exists(keys.control("old-worker")) == 0
    finally:
        assert fresh.stop() == 0


def test_fresh_is_refused_while_workers_of_the_prefix_are_alive(
    aegis_env: dict[str, str], redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    redis_client.set(keys.worker_alive("busy-gpu0"), "1", ex=60)
    ControlStore(redis_client, keys).write("busy-gpu0", ControlSettings(batch_size=64))
    launcher = _launcher(aegis_env, tmp_path, "--only", "agent", "--fresh")
    assert launcher.process.wait(60) == 2
    assert "--fresh refused: worker(s) busy-gpu0 are alive" in launcher.log()
    assert redis_client.exists(keys.control("busy-gpu0")) == 1


def test_workers_gpus_without_a_gpu_says_so(aegis_env: dict[str, str], tmp_path: Path) -> None:
    env = {**aegis_env, "CUDA_VISIBLE_DEVICES": ""}
    launcher = _launcher(env, tmp_path, "--only", "worker", "--workers", "gpus")
    assert launcher.process.wait(60) == 2
    assert "no GPU is visible" in launcher.log()
