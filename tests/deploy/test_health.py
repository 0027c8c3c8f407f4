"""``aegis health SERVICE`` fails while the service is not there: the checks are not
trivially true (their passing side is in test_container_commands)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from shared.keys import Keys
from shared.schemas import TelemetrySample, dump
from tests.deploy.compose import ROOT
from tests.processes import free_port


def _health(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "aegis_cli", "health", service]
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("service", "why"),
    [
        ("gateway", "Connection refused"),
        ("dashboard", "Connection refused"),
        ("worker", "no heartbeat at"),
        ("monitor", "no telemetry sample of"),
        ("jobs", "no rq worker of this host"),
    ],
)
def test_a_service_that_is_not_running_is_unhealthy(
    service: str, why: str, aegis_env: dict[str, str]
) -> None:
    env = {**aegis_env, "AEGIS_GATEWAY_PORT": str(free_port()),
           "AEGIS_DASHBOARD_PORT": str(free_port()), "AEGIS_WORKER_ID": "nobody"}  # fmt: skip
    done = _health(service, env)
    assert done.returncode == 1 and f"{service} unhealthy" in done.stderr and why in done.stderr


def test_the_agent_is_unhealthy_when_redis_does_not_answer(aegis_env: dict[str, str]) -> None:
    env = {**aegis_env, "AEGIS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = _health("agent", env)
    assert done.returncode == 1 and "agent unhealthy" in done.stderr
    assert _health("agent", aegis_env).returncode == 0


def test_a_worker_check_needs_the_worker_id(aegis_env: dict[str, str]) -> None:
    done = _health("worker", {**aegis_env, "AEGIS_WORKER_ID": ""})
    assert done.returncode == 1 and "set AEGIS_WORKER_ID" in done.stderr


def test_the_monitor_is_healthy_only_with_a_fresh_sample_of_its_own_host(
    aegis_env: dict[str, str], redis_client: redis.Redis, keys: Keys
) -> None:
    def publish(host: str, age_s: float) -> None:
        sample = TelemetrySample(host=host, gpu="none", ts=time.time() - age_s)
        redis_client.xadd(keys.telemetry_stream, {"data": dump(sample)})

    env = {**aegis_env, "AEGIS_HOST_NAME": "node-a"}
    publish("node-a", age_s=120)
    publish("node-b", age_s=0)  # another host's monitor does not count
    done = _health("monitor", env)
    assert done.returncode == 1 and "latest sample of node-a is 120s old" in done.stderr
    publish("node-a", age_s=0)
    assert _health("monitor", env).returncode == 0
