"""docker-compose.yml checked by a real Compose implementation, with and without each
profile and with a GPU override written by ``aegis compose``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.compose import ROOT, SECRETS, env_file, resolved, run_compose

BASE = ROOT / "docker-compose.yml"
AEGIS_SERVICES = {"gateway", "worker", "monitor", "agent", "jobs", "dashboard"}
STORES = {"redis", "postgres"}
OBSERVABILITY = {"prometheus", "grafana"}


@pytest.fixture
def env(tmp_path: Path) -> Path:
    return env_file(tmp_path)


def test_the_base_file_is_valid(env: Path) -> None:
    done = run_compose([BASE], env, "config", "-q")
    assert done.returncode == 0, done.stderr


def test_a_broken_file_is_refused(env: Path, tmp_path: Path) -> None:
    """The validation really validates: a dependency on an unknown service fails."""
    broken = tmp_path / "docker-compose.yml"
    healthy_redis = "redis: {condition: service_healthy}"
    broken.write_text(BASE.read_text().replace(healthy_redis, f"r{healthy_redis}", 1))
    done = run_compose([broken], env, "config", "-q")
    assert done.returncode != 0 and "rredis" in done.stderr


def test_the_observability_profile_adds_prometheus_and_grafana(env: Path) -> None:
    assert set(resolved([BASE], env)["services"]) == AEGIS_SERVICES | STORES
    with_profile = resolved([BASE], env, profiles=("observability",))
    assert set(with_profile["services"]) == AEGIS_SERVICES | STORES | OBSERVABILITY


@pytest.mark.parametrize("profiles", [(), ("observability",)])
def test_every_service_has_a_health_check_and_waits_for_healthy_dependencies(
    env: Path, profiles: tuple[str, ...]
) -> None:
    for name, service in resolved([BASE], env, profiles)["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}"
        if name in AEGIS_SERVICES:
            assert set(service["depends_on"]) >= ({"postgres"} if name == "dashboard" else STORES)


def test_secrets_come_from_the_env_file_and_nothing_is_hard_coded(
    env: Path, tmp_path: Path
) -> None:
    services = resolved([BASE], env, ("observability",))["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    for name in AEGIS_SERVICES:
        environment = services[name]["environment"]
        assert f":{SECRETS['POSTGRES_PASSWORD']}@postgres" in environment["AEGIS_DATABASE_URL"]
        assert f":{SECRETS['REDIS_PASSWORD']}@redis" in environment["AEGIS_REDIS_URL"]
    assert services["gateway"]["environment"]["AEGIS_API_KEYS"] == SECRETS["AEGIS_API_KEYS"]
    assert SECRETS["REDIS_PASSWORD"] in services["redis"]["command"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    # The committed example has no secret: Compose refuses to start until they are set.
    done = run_compose([BASE], ROOT / "deploy" / ".env.example", "config", "-q")
    assert done.returncode != 0 and "_PASSWORD in .env" in done.stderr


@pytest.mark.parametrize(
    "secret", ["REDIS_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"]
)
def test_each_secret_is_required(tmp_path: Path, secret: str) -> None:
    env = env_file(tmp_path, {**SECRETS, secret: ""})
    done = run_compose([BASE], env, "config", "-q", profiles=("observability",))
    assert done.returncode != 0 and f"set {secret} in .env" in done.stderr


def test_a_host_that_only_adds_workers_points_them_at_the_shared_stores(
    tmp_path: Path,
) -> None:
    shared = {"AEGIS_REDIS_URL": "redis://:pw@stores.example:6379/0",
              "AEGIS_DATABASE_URL": "postgresql://aegis:pw@stores.example:5432/aegis",
              "AEGIS_NODE": "node1"}  # fmt: skip
    services = resolved([BASE], env_file(tmp_path, {**SECRETS, **shared}))["services"]
    for name in ("worker", "monitor"):
        environment = services[name]["environment"]
        assert environment["AEGIS_REDIS_URL"] == shared["AEGIS_REDIS_URL"]
        assert environment["AEGIS_DATABASE_URL"] == shared["AEGIS_DATABASE_URL"]
    assert services["worker"]["environment"]["AEGIS_WORKER_ID"] == "node1-gpu0"
    # The agent pairs a worker with its host's telemetry by host name.
    assert services["monitor"]["environment"]["AEGIS_HOST_NAME"] == "node1"
    assert services["worker"]["hostname"] == "node1"


def test_the_gateway_runs_several_processes_as_the_env_says(tmp_path: Path) -> None:
    gateway = resolved([BASE], env_file(tmp_path))["services"]["gateway"]
    assert gateway["environment"]["AEGIS_GATEWAY_PROCESSES"] == "4"  # .env.example's
    without = {**SECRETS, "AEGIS_GATEWAY_PROCESSES": ""}
    gateway = resolved([BASE], env_file(tmp_path, without))["services"]["gateway"]
    assert gateway["environment"]["AEGIS_GATEWAY_PROCESSES"] == "4"  # the file's default
    two = {**SECRETS, "AEGIS_GATEWAY_PROCESSES": "2"}
    gateway = resolved([BASE], env_file(tmp_path, two))["services"]["gateway"]
    assert gateway["environment"]["AEGIS_GATEWAY_PROCESSES"] == "2"


def test_published_ports_stay_on_loopback_unless_the_env_says_otherwise(env: Path) -> None:
    services = resolved([BASE], env, ("observability",))["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for p in published)


def test_the_monitor_reads_every_gpu_through_nvml_without_cuda(env: Path) -> None:
    monitor = resolved([BASE], env)["services"]["monitor"]
    (device,) = monitor["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == -1 and set(device["capabilities"]) == {"gpu", "utility"}


def test_every_image_is_built_here_or_pinned_to_a_precise_version(env: Path) -> None:
    for name, service in resolved([BASE], env, ("observability",))["services"].items():
        image = service["image"]
        if "build" in service:
            assert image in ("aegis-runtime:slim", "aegis-runtime:worker"), name
            assert service["build"]["target"] == image.split(":")[1]
        else:
            # Postgres numbers its releases major.minor; the others major.minor.patch.
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+(\.\d+)?", image), f"{name}: {image}"


def test_redis_keeps_an_append_only_file_on_a_volume(env: Path) -> None:
    redis = resolved([BASE], env)["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


@pytest.mark.parametrize("profiles", [(), ("observability",)])
def test_the_cpu_override_asks_for_no_gpu(env: Path, profiles: tuple[str, ...]) -> None:
    files = [BASE, ROOT / "docker-compose.cpu.yml"]
    services = resolved(files, env, profiles)["services"]
    for name, service in services.items():
        assert "deploy" not in service, f"{name} still reserves a device"
    worker = services["worker"]["environment"]
    assert (worker["AEGIS_DEVICE"], worker["AEGIS_MODEL"]) == ("cpu", "smollm2-135m")


def _gpu_override(tmp_path: Path, gpus: str) -> list[Path]:
    """Write the override with the real CLI beside a copy of the base file."""
    shutil.copy(BASE, tmp_path / "docker-compose.yml")
    done = subprocess.run([sys.executable, "-m", "aegis_cli", "compose", "--gpus", gpus,
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [tmp_path / "docker-compose.yml", tmp_path / "docker-compose.gpus.yml"]


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if n.startswith("worker")}


@pytest.mark.parametrize("profiles", [(), ("observability",)])
def test_a_gpu_override_runs_one_worker_per_gpu(
    env: Path, tmp_path: Path, profiles: tuple[str, ...]
) -> None:
    files = _gpu_override(tmp_path, "0,2,3")
    assert run_compose(files, env, "config", "-q", profiles=profiles).returncode == 0
    workers = _workers(resolved(files, env, profiles))
    assert set(workers) == {"worker", "worker-gpu2", "worker-gpu3"}
    seen = []
    for service in workers.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        environment = service["environment"]
        port = environment["AEGIS_WORKER_METRICS_PORT"]
        seen.append((device["device_ids"], environment["AEGIS_WORKER_ID"], port))
        assert service["expose"] == [port] and environment["AEGIS_DEVICE"] == "cuda:0"
        assert set(device["capabilities"]) == {"gpu", "compute", "utility"}  # CUDA and NVML
        assert service["healthcheck"]["test"] == ["CMD", "aegis", "health", "worker"]
        assert set(service["depends_on"]) == STORES
        assert service["hostname"] == "node0"  # as the monitor's samples say
    assert sorted(seen) == [
        (["0"], "node0-gpu0", "9400"),
        (["2"], "node0-gpu2", "9401"),
        (["3"], "node0-gpu3", "9402"),
    ]
    targets = json.loads((tmp_path / "deploy/prometheus/targets/workers-gpus.json").read_text())
    assert targets[0]["targets"] == ["worker-gpu2:9401", "worker-gpu3:9402"]


def test_a_single_gpu_override_moves_the_worker(env: Path, tmp_path: Path) -> None:
    workers = _workers(resolved(_gpu_override(tmp_path, "5"), env))
    (device,) = workers["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert list(workers) == ["worker"] and device["device_ids"] == ["5"]


def test_the_override_is_written_with_the_standard_library_alone(tmp_path: Path) -> None:
    """On a Docker host without AEGIS installed: `python3 aegis_cli.py compose ...`."""
    shutil.copy(BASE, tmp_path / "docker-compose.yml")
    blocked = ["pydantic", "pydantic_settings", "redis", "rq", "httpx", "shared", "services"]
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); "
        f"sys.argv = ['aegis_cli.py', 'compose', '--gpus', '0,1', '--dir', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(ROOT / 'aegis_cli.py')!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "worker-gpu1:" in (tmp_path / "docker-compose.gpus.yml").read_text()


@pytest.mark.parametrize("bad", ["", "0,0", "a,b", "-1"])
def test_bad_gpu_lists_are_refused(tmp_path: Path, bad: str) -> None:
    shutil.copy(BASE, tmp_path / "docker-compose.yml")
    done = subprocess.run([sys.executable, "-m", "aegis_cli", "compose", f"--gpus={bad}",
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "--gpus" in done.stderr
    assert not (tmp_path / "docker-compose.gpus.yml").exists()
