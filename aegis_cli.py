"""The ``aegis`` command.

- ``aegis run``: the whole system (or ``--only`` some services) as local processes.
- ``aegis compose --gpus 0,1``: write the Compose override with one worker per GPU.
- ``aegis health SERVICE``: exit 0 when that service answers (the images' health checks).
- ``aegis jobs``: the batch-jobs worker (``rq worker`` on the configured Redis and queue).
- ``aegis bench``: the benchmark suite (its own options: ``aegis bench --help``).

Only the standard library is imported at the top, so ``python3 aegis_cli.py compose``
works on a Docker host where AEGIS itself is not installed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

    from shared.config import CommonSettings


OVERRIDE_FILE = "docker-compose.gpus.yml"
TARGETS_FILE = Path("deploy/prometheus/targets/workers-gpus.json")
FIRST_METRICS_PORT = 9400
HEALTH_TIMEOUT_S = 3.0
# A monitor whose latest sample is older than this many intervals (or 15 s) is unhealthy.
TELEMETRY_STALE_INTERVALS = 5


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:  # its own CLI parses the rest
        from experiments.benchmark import main as bench_main

        return bench_main(args[1:])
    options = parse_args(args)
    handler: Callable[[argparse.Namespace], int] = options.handler
    return handler(options)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aegis", description="AEGIS Runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the whole system as local processes")
    if argv[:1] == ["run"]:  # the launcher imports every service's settings: only for run
        from services.launcher import add_run_arguments, run

        add_run_arguments(run_parser)
        run_parser.set_defaults(handler=run)
    compose = sub.add_parser("compose", help=f"write {OVERRIDE_FILE}: one worker per GPU")
    compose.add_argument("--gpus", type=gpu_list, required=True, help="GPU indexes, e.g. 0,1")
    compose.add_argument("--dir", type=Path, default=Path("."), help="the repository root")
    compose.set_defaults(handler=write_compose_override)
    health = sub.add_parser("health", help="exit 0 when the service answers")
    health.add_argument("service", choices=sorted(HEALTH_CHECKS))
    health.set_defaults(handler=check_health)
    jobs = sub.add_parser("jobs", help="run the batch-jobs worker (rq) in the foreground")
    jobs.set_defaults(handler=run_jobs_worker)
    sub.add_parser("bench", help="run the benchmark suite: aegis bench --help")
    return parser.parse_args(argv)


# -- aegis compose ---------------------------------------------------------------------------


def gpu_list(value: str) -> list[int]:
    """``0,1,3`` -> [0, 1, 3]: distinct non-negative GPU indexes."""
    if not re.fullmatch(r"\d+(,\d+)*", value):
        raise argparse.ArgumentTypeError(f"{value!r}: give GPU indexes like 0,1")
    gpus = [int(g) for g in value.split(",")]
    if len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{value!r}: a GPU listed twice")
    return gpus


def worker_service(gpu: int, position: int) -> str:
    """YAML of one worker service of the override (the first one is the base ``worker``)."""
    port = FIRST_METRICS_PORT + position
    name = "worker" if position == 0 else f"worker-gpu{gpu}"
    extends = "" if position == 0 else "    extends: {file: docker-compose.yml, service: worker}\n"
    return (
        f"  {name}:\n{extends}"
        "    environment:\n"
        f"      AEGIS_WORKER_ID: ${{AEGIS_NODE:-node0}}-gpu{gpu}\n"
        f'      AEGIS_WORKER_METRICS_PORT: "{port}"\n'
        f'    expose: !override ["{port}"]\n'
        "    deploy:\n"
        "      resources:\n"
        "        reservations:\n"
        f'          devices: !override [{{driver: nvidia, device_ids: ["{gpu}"], '
        "capabilities: [gpu, compute, utility]}]\n"
    )


def compose_override(gpus: list[int]) -> str:
    """The override file: the base worker on the first GPU, one more service per GPU."""
    header = (
        f"# Written by `aegis compose --gpus {','.join(map(str, gpus))}`: one worker per GPU,\n"
        "# each with its own id and metrics port. Regenerate it rather than edit it. Use:\n"
        f"#   docker compose -f docker-compose.yml -f {OVERRIDE_FILE} up -d\n"
        "services:\n"
    )
    return header + "".join(worker_service(g, i) for i, g in enumerate(gpus))


def prometheus_targets(gpus: list[int]) -> str:
    """file_sd targets of the workers beyond the base one (which prometheus.yml lists)."""
    targets = [f'"worker-gpu{gpu}:{FIRST_METRICS_PORT + i}"' for i, gpu in enumerate(gpus) if i > 0]
    return f'[{{"targets": [{", ".join(targets)}], "labels": {{"service": "worker"}}}}]\n'


def write_compose_override(options: argparse.Namespace) -> int:
    root: Path = options.dir
    if not (root / "docker-compose.yml").is_file():
        print(f"aegis compose: no docker-compose.yml in {root.resolve()}", file=sys.stderr)
        return 2
    (root / OVERRIDE_FILE).write_text(compose_override(options.gpus))
    targets = root / TARGETS_FILE
    targets.parent.mkdir(parents=True, exist_ok=True)
    targets.write_text(prometheus_targets(options.gpus))
    print(f"wrote {root / OVERRIDE_FILE} and {targets}")
    return 0


# -- aegis health ----------------------------------------------------------------------------


def _local(host: str) -> str:
    """Where to connect to a server listening on ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _http_ok(url: str, headers: dict[str, str] | None = None) -> str | None:
    import httpx

    try:
        status = httpx.get(url, headers=headers, timeout=HEALTH_TIMEOUT_S).status_code
    except httpx.HTTPError as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def _redis(settings: CommonSettings) -> redis.Redis:
    import redis

    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=HEALTH_TIMEOUT_S, socket_connect_timeout=HEALTH_TIMEOUT_S
    )


def gateway_health() -> str | None:
    from services.gateway.config import GatewaySettings

    settings = GatewaySettings()
    headers = {}
    if settings.api_keys and settings.auth_operations:  # /health wants a key too
        headers["Authorization"] = f"Bearer {settings.api_keys[0].get_secret_value()}"
    url = f"http://{_local(settings.gateway_host)}:{settings.gateway_port}/health"
    return _http_ok(url, headers)


def dashboard_health() -> str | None:
    from services.dashboard.config import DashboardSettings

    settings = DashboardSettings()
    host = _local(settings.dashboard_host)
    return _http_ok(f"http://{host}:{settings.dashboard_port}/_stcore/health")


def worker_health() -> str | None:
    """The worker's heartbeat key: present while its loop runs (after the model loaded)."""
    from shared.config import CommonSettings
    from shared.keys import Keys

    class WorkerIdentity(CommonSettings):
        """The id only: WorkerSettings would probe the metrics port the worker holds."""

        worker_id: str = ""

    settings = WorkerIdentity()
    if not settings.worker_id:
        return "set AEGIS_WORKER_ID: the health check looks for that worker's heartbeat"
    key = Keys(settings.key_prefix).worker_alive(settings.worker_id)
    return None if _redis(settings).exists(key) else f"no heartbeat at {key}"


def monitor_health() -> str | None:
    """A telemetry sample from this host, fresh enough, in the capped stream."""
    from services.monitor.config import MonitorSettings
    from shared.keys import Keys
    from shared.schemas import TelemetrySample, load

    settings = MonitorSettings()
    host = settings.host_name or socket.gethostname()
    max_age_s = max(15.0, TELEMETRY_STALE_INTERVALS * settings.interval_s)
    entries = _redis(settings).xrevrange(Keys(settings.key_prefix).telemetry_stream, count=64)
    for _entry_id, fields in entries or []:
        sample = load(TelemetrySample, next(iter((fields or {}).values())))
        if sample.host == host:
            age_s = time.time() - sample.ts
            return None if age_s <= max_age_s else f"latest sample of {host} is {age_s:.0f}s old"
    return f"no telemetry sample of {host} among the latest"


def agent_health() -> str | None:
    """The agent keeps no heartbeat: its process is up (it runs this) and Redis answers."""
    from shared.config import CommonSettings

    settings = CommonSettings()
    return None if _redis(settings).ping() else "Redis does not answer"


def jobs_health() -> str | None:
    """An rq worker of this host is registered on the jobs queue."""
    from rq import Queue, Worker

    from shared.config import CommonSettings
    from shared.keys import Keys

    settings = CommonSettings()
    client = _redis(settings)
    queue = Queue(Keys(settings.key_prefix).rq_queue, connection=client)
    hosts = {w.hostname for w in Worker.all(connection=client, queue=queue)}
    return None if socket.gethostname() in hosts else f"no rq worker of this host on {queue.name}"


HEALTH_CHECKS: dict[str, Callable[[], str | None]] = {
    "gateway": gateway_health,
    "dashboard": dashboard_health,
    "worker": worker_health,
    "monitor": monitor_health,
    "agent": agent_health,
    "jobs": jobs_health,
}


def check_health(options: argparse.Namespace) -> int:
    try:
        problem = HEALTH_CHECKS[options.service]()
    except Exception as exc:  # a health check reports any failure as unhealthy
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"{options.service} unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


# -- aegis jobs ------------------------------------------------------------------------------


def run_jobs_worker(_options: argparse.Namespace) -> int:
    """Replace this process by ``rq worker`` on the configured Redis and the prefix's queue.

    The URL (it may hold a password) goes in rq's ``RQ_REDIS_URL``, not in the argv that
    ``ps`` shows; exec, so signals reach rq directly.
    """
    from shared.config import CommonSettings
    from shared.keys import Keys

    settings = CommonSettings()
    queue = Keys(settings.key_prefix).rq_queue
    argv = [sys.executable, "-m", "rq.cli", "worker", "--quiet", queue]
    os.execve(argv[0], argv, {**os.environ, "RQ_REDIS_URL": settings.redis_url})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
