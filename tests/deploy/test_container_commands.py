"""Each AEGIS service's container command, exactly as Compose resolves it, started as a
local process against the test Redis and Postgres; its container health check (also as
Compose resolves it) must pass, and SIGTERM must stop it cleanly.

Only what points outside this machine's test services is replaced: the addresses of
Redis and Postgres, ports (several test runs share the machine), the data dir, and for
the worker the device and model (CPU, ``synthetic:tiny``). ``python`` and ``aegis`` are
this checkout's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.deploy.compose import ROOT, env_file, resolved
from tests.processes import Service, free_port, wait_for

pytestmark = pytest.mark.slow

# What the agent and the monitor log once their loop runs (and SIGTERM is theirs to handle).
RUNNING_LOG = {"agent": "agent started", "monitor": "monitor started"}
# `aegis` as this checkout's module: an installed console script may import another copy.
EXECUTABLES = {"python": [sys.executable], "aegis": [sys.executable, "-m", "aegis_cli"]}


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("compose")
    config: dict[str, Any] = resolved([ROOT / "docker-compose.yml"], env_file(folder))
    return config["services"]


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A schema of its own in the test database; the URL selects it for every process."""
    schema = f"compose_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _local(argv: list[str]) -> list[str]:
    return [*EXECUTABLES.get(argv[0], argv[:1]), *argv[1:]]


def _test_env(
    service: dict[str, Any], aegis_env: dict[str, str], database_url: str, tmp_path: Path
) -> dict[str, str]:
    env = {k: str(v) for k, v in service["environment"].items()}
    env.update(aegis_env)  # test Redis, key prefix, data dir
    env.update(
        AEGIS_DATABASE_URL=database_url,
        HF_HOME=str(tmp_path / "hf"),
        AEGIS_GATEWAY_HOST="127.0.0.1",
        AEGIS_GATEWAY_PORT=str(free_port()),
        AEGIS_DASHBOARD_HOST="127.0.0.1",
        AEGIS_DASHBOARD_PORT=str(free_port()),
        AEGIS_WORKER_METRICS_HOST="127.0.0.1",
        AEGIS_WORKER_METRICS_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
    )
    if "AEGIS_DEVICE" in env:
        env.update(AEGIS_DEVICE="cpu", AEGIS_MODEL="synthetic:tiny")
    return env


def _healthy(check: list[str], env: dict[str, str]) -> bool:
    assert check[0] == "CMD"
    done = subprocess.run(_local(check[1:]), cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    return done.returncode == 0


@pytest.mark.parametrize("name", ["gateway", "worker", "monitor", "agent", "jobs", "dashboard"])
def test_the_container_command_starts_turns_healthy_and_stops_on_sigterm(
    name: str,
    services: dict[str, Any],
    aegis_env: dict[str, str],
    postgres_schema: str,
    tmp_path: Path,
) -> None:
    service = services[name]
    env = _test_env(service, aegis_env, postgres_schema, tmp_path)
    process = Service(name, _local(service["command"]), env, tmp_path)
    try:
        check = service["healthcheck"]["test"]
        wait_for(lambda: _healthy(check, env), 180, f"{name} healthy", process)
        if name in RUNNING_LOG:  # their check only proves Redis answers: wait for the loop
            wait_for(lambda: RUNNING_LOG[name] in process.log(), 60, f"{name} running", process)
    finally:
        code = process.stop(timeout_s=60)
    # uvicorn re-raises SIGTERM after its graceful shutdown (Docker counts that as a stop).
    assert code == 0 or (name == "gateway" and code == -signal.SIGTERM), (
        f"exit code {code}\n{process.log_path.read_text()}"
    )


def test_the_gateway_health_check_brings_a_key_when_health_needs_one(
    services: dict[str, Any], aegis_env: dict[str, str], postgres_schema: str, tmp_path: Path
) -> None:
    service = services["gateway"]
    env = _test_env(service, aegis_env, postgres_schema, tmp_path)
    env.update(AEGIS_API_KEYS="sk-first,sk-second", AEGIS_AUTH_OPERATIONS="true")
    process = Service("gateway", _local(service["command"]), env, tmp_path)
    try:
        check = service["healthcheck"]["test"]
        wait_for(lambda: _healthy(check, env), 120, "gateway healthy", process)
        url = f"http://127.0.0.1:{env['AEGIS_GATEWAY_PORT']}/health"
        assert httpx.get(url, timeout=5).status_code == 401  # the key is what let it in
    finally:
        process.stop(timeout_s=60)
