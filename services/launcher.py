"""``aegis run``: start every service as a local process and supervise them.

The same services as the Docker Compose deployment, on the embedded defaults: SQLite
under the data dir, Redis at ``AEGIS_REDIS_URL`` (a local ``redis-server`` is started
when none answers). Before anything starts, every service's settings are validated
(a bad ``AEGIS_*`` value stops the launcher with pydantic's message) and state left in
Redis by an earlier run is reported (``--fresh`` clears it). A service that dies is
restarted with a back-off, but one that keeps dying soon after its start stops the
launcher instead of flapping forever. Ctrl-C or SIGTERM stops them all gracefully (a
worker finishes or hands back its batch).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings
from rq import Queue

from services.agent.config import AgentSettings
from services.dashboard.config import DashboardSettings
from services.gateway.config import GatewaySettings
from services.monitor.config import MonitorSettings
from services.worker.config import DEFAULT_METRICS_PORT, WorkerSettings
from shared.config import CommonSettings
from shared.control import ControlStore
from shared.keys import WORKER_GROUP, Keys
from shared.logs import setup_logging
from shared.redis_server import RedisUnavailable, ensure_redis
from shared.schemas import ModelInfo, load

log = logging.getLogger("aegis.launcher")

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway", "worker", "monitor", "agent", "jobs", "dashboard")
SETTINGS_OF: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "monitor": MonitorSettings,
    "agent": AgentSettings,
    "jobs": CommonSettings,
    "dashboard": DashboardSettings,
}
EXIT_BAD_SETTINGS = 2
EXIT_SERVICE_FAILED = 1


class LauncherSettings(CommonSettings):
    """The launcher's own knobs, plus the worker fields it derives per-worker values from."""

    # A child that exits this many times in a row, each time within `stable_after_s` of
    # its start, is not restarted again: the launcher stops with its exit code.
    restart_limit: int = Field(default=5, ge=1)
    stable_after_s: float = Field(default=60.0, gt=0)
    stop_grace_s: float = Field(default=30.0, gt=0)
    # Read (not owned) from the worker's variables to number several workers.
    worker_id: str = ""
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    device: str = "auto"
    # CUDA's own variable (no AEGIS_ prefix): the GPUs `--workers gpus` may use.
    cuda_visible_devices: str | None = Field(default=None, validation_alias="CUDA_VISIBLE_DEVICES")


@dataclass
class Child:
    """One supervised service process."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    quick_failures: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env})
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)


def service_argv(name: str) -> list[str]:
    """The command line that runs one service with this interpreter (as the images do)."""
    if name == "jobs":
        return [sys.executable, "-m", "aegis_cli", "jobs"]
    return [sys.executable, "-m", f"services.{name}"]


def worker_count(value: str) -> int | str:
    """``--workers``: a count >= 1, or ``gpus`` for one per visible GPU."""
    if value == "gpus":
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'gpus'") from None
    if count < 1:
        raise argparse.ArgumentTypeError("at least one worker")
    return count


def visible_gpus(settings: LauncherSettings) -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else NVML's count."""
    visible = settings.cuda_visible_devices
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import pynvml  # the monitor's dependency: no torch needed to count GPUs

    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0


def worker_envs(workers: int | str, settings: LauncherSettings) -> list[dict[str, str]]:
    """The environment of each worker: its own id, metrics port and (per GPU) device.

    One worker on the configured device keeps the worker's own defaults. Several get
    ``<id>-<i>`` (``<host>-<device>-<i>`` without ``AEGIS_WORKER_ID``) and ports counted up
    from ``AEGIS_WORKER_METRICS_PORT`` (9400); with ``gpus``, worker i runs on ``cuda:i``.
    """
    if workers == 1:
        return [{}]
    per_gpu = workers == "gpus"
    count = visible_gpus(settings) if per_gpu else int(workers)
    if count == 0:
        raise ValueError("--workers gpus: no GPU is visible (NVML); use --workers N")
    base_port = settings.worker_metrics_port
    base_port = DEFAULT_METRICS_PORT if base_port is None else base_port
    envs = []
    for i in range(count):
        device = f"cuda:{i}" if per_gpu else settings.device
        if settings.worker_id:
            worker_id = f"{settings.worker_id}-{i}"
        elif per_gpu:
            worker_id = f"{socket.gethostname()}-cuda{i}"
        else:
            worker_id = f"{socket.gethostname()}-{device.replace(':', '')}-{i}"
        envs.append(
            {
                "AEGIS_WORKER_ID": worker_id,
                "AEGIS_DEVICE": device,
                "AEGIS_WORKER_METRICS_PORT": str(base_port + i if base_port else 0),
            }
        )
    return envs


def plan_children(names: list[str], workers: int | str, settings: LauncherSettings) -> list[Child]:
    """One child per service; the worker service expands to one child per worker."""
    children = []
    for name in names:
        if name != "worker":
            children.append(Child(name, service_argv(name)))
            continue
        envs = worker_envs(workers, settings)
        for i, env in enumerate(envs):
            label = "worker" if len(envs) == 1 else f"worker-{i}"
            children.append(Child(label, service_argv("worker"), env))
    return children


def settings_errors(children: list[Child]) -> list[str]:
    """Pydantic's message for every child whose settings do not validate."""
    errors = []
    for child in children:
        settings_class = SETTINGS_OF[child.name.split("-")[0]]
        overrides: dict[str, Any] = {
            k.removeprefix("AEGIS_").lower(): v for k, v in child.env.items()
        }
        try:
            settings_class(**overrides)
        except ValidationError as exc:
            names = sorted({f"AEGIS_{str(e['loc'][0]).upper()}" for e in exc.errors() if e["loc"]})
            hint = f"\n  (variables: {', '.join(names)})" if names else ""
            errors.append(f"{child.name}: {exc}{hint}")
    return errors


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The options of ``aegis run`` (the CLI in ``aegis_cli`` owns the parser)."""
    run.add_argument("--only", nargs="+", choices=SERVICES, help="start just these services")
    run.add_argument("--without", nargs="+", choices=SERVICES, default=[], help="leave these out")
    run.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="how many workers: a number (each with its own id and metrics port), "
        "or 'gpus' for one per visible GPU (default 1)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="first delete what an earlier run left in Redis under AEGIS_KEY_PREFIX "
        "(agent settings, model key, queued and pending requests, results, jobs)",
    )


def run(args: argparse.Namespace) -> int:
    """``aegis run``: validate, look at Redis, start the children and supervise them."""
    try:
        settings = LauncherSettings()
    except ValidationError as exc:  # before logging is set up: plain stderr
        print(f"aegis run: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    setup_logging(settings.log_level, settings.log_json, "launcher")
    names = [n for n in (args.only or SERVICES) if n not in args.without]
    try:
        children = plan_children(names, args.workers, settings)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTINGS
    errors = settings_errors(children)
    if errors:
        for error in errors:
            log.error("bad setting for %s", error)
        log.error("nothing was started: fix the AEGIS_* variables named above")
        return EXIT_BAD_SETTINGS
    try:
        redis_process = ensure_redis(settings.redis_url, settings.data_dir / "redis")
    except RedisUnavailable as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTINGS
    try:
        if not _review_leftovers(settings, fresh=args.fresh):
            return EXIT_BAD_SETTINGS
        return Supervisor(children, settings).run()
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)


@dataclass
class Leftovers:
    """What an earlier run left in Redis that would shape this start."""

    live_workers: list[str] = field(default_factory=list)
    # Control settings of workers that are not alive: a worker with that id resumes them.
    settings: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # published by a worker that is gone: /ready would be wrong
    queued: int = 0  # requests never delivered: the next worker runs them
    pending: int = 0  # delivered to a worker that never acknowledged them
    jobs: int = 0  # batch jobs waiting in the RQ queue

    @property
    def stale(self) -> bool:
        return bool(self.settings or self.model or self.queued or self.pending or self.jobs)

    def describe(self) -> list[str]:
        """One log line per finding."""
        lines = []
        if self.live_workers:
            lines.append(f"joining a running deployment: live worker(s) {self.live_workers}")
        for worker_id, summary in sorted(self.settings.items()):
            lines.append(
                f"agent settings left for worker {worker_id!r} (it resumes them): {summary}"
            )
        if self.model:
            lines.append(f"model key left by a worker that is gone: {self.model}")
        if self.queued or self.pending:
            lines.append(
                f"{self.queued} request(s) queued and {self.pending} pending (delivered, never "
                "acknowledged) from an earlier run: the workers will run them"
            )
        if self.jobs:
            lines.append(f"{self.jobs} batch job(s) queued from an earlier run")
        return lines


def find_leftovers(client: redis.Redis, keys: Keys) -> Leftovers:
    """Read (never change) the state under ``keys.prefix``."""
    found = Leftovers()
    alive_keys = client.scan_iter(keys.worker_alive("*"), count=1000)
    head, tail = keys.worker_alive("*").split("*")
    found.live_workers = sorted(_text(k).removeprefix(head).removesuffix(tail) for k in alive_keys)
    store = ControlStore(client, keys)
    for key in client.scan_iter(keys.control("*"), count=1000):
        worker_id = _text(key).removeprefix(keys.control(""))
        if worker_id not in found.live_workers:
            found.settings[worker_id] = _settings_summary(store, worker_id)
    raw_model = client.get(keys.model_info)
    if raw_model and not found.live_workers:
        found.model = _model_name(raw_model)
    found.pending = _pending(client, keys)
    found.queued = max(0, int(client.xlen(keys.requests)) - found.pending)
    found.jobs = Queue(keys.rq_queue, connection=client).count
    return found


def clear_state(client: redis.Redis, keys: Keys) -> int:
    """Delete every key under the prefix and the queued batch jobs; how many keys went."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(f"{keys.prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(client.unlink(*batch))
    Queue(keys.rq_queue, connection=client).empty()
    return removed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _settings_summary(store: ControlStore, worker_id: str) -> str:
    try:
        settings = store.read(worker_id)
    except ValidationError:
        return "unreadable (written by another version of AEGIS)"
    if settings is None:
        return "none"
    fields = settings.model_dump(exclude={"reason", "updated_at"})
    return " ".join(f"{k}={v}" for k, v in fields.items()) + f" ({settings.reason})"


def _model_name(raw: bytes | str) -> str:
    try:
        return load(ModelInfo, raw).name
    except ValidationError:
        return "unreadable (written by another version of AEGIS)"


def _pending(client: redis.Redis, keys: Keys) -> int:
    try:
        groups = client.xinfo_groups(keys.requests)
    except redis.ResponseError:  # no stream yet
        return 0
    return sum(int(g["pending"]) for g in groups if _text(g["name"]) == WORKER_GROUP)


def _review_leftovers(settings: LauncherSettings, fresh: bool) -> bool:
    """Report (or with ``fresh`` clear) earlier state; False when it is not safe to go on."""
    client = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    where = _without_password(settings.redis_url)
    try:
        leftovers = find_leftovers(client, keys)
        if leftovers.live_workers and fresh:
            log.error(
                "--fresh refused: worker(s) %s are alive on %s under prefix %r (another "
                "AEGIS runs there): stop them, or use another AEGIS_KEY_PREFIX",
                ", ".join(leftovers.live_workers),
                where,
                settings.key_prefix,
            )
            return False
        if fresh:
            removed = clear_state(client, keys)
            log.warning("--fresh: removed %d key(s) under prefix %r", removed, keys.prefix)
            return True
        for line in leftovers.describe():
            log.warning("%s", line)
        if leftovers.stale:
            log.warning("`aegis run --fresh` starts from a clean Redis state instead")
        return True
    except redis.RedisError as exc:
        log.error("cannot read the state in Redis at %s: %s", where, exc)
        return False
    finally:
        client.close()


def _without_password(url: str) -> str:
    """The URL as it may be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


class Supervisor:
    """Keeps the children running until asked to stop, then stops them in order."""

    def __init__(self, children: list[Child], settings: LauncherSettings) -> None:
        self.children = children
        self.settings = settings
        self.stopping = False
        self.failed: Child | None = None

    def _ask_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping services", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        previous = {s: signal.signal(s, self._ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        try:
            for child in self.children:
                child.start()
            while not self.stopping:
                self._restart_dead()
                time.sleep(0.5)
        finally:  # whatever ended the loop, no child is left behind
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return EXIT_SERVICE_FAILED if self.failed else 0

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            if child.next_start == 0.0:
                self._schedule_restart(child, now)
                if self.stopping:
                    return
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()

    def _schedule_restart(self, child: Child, now: float) -> None:
        """Back off exponentially; give up on a child that keeps dying right after start."""
        assert child.process is not None
        code = child.process.returncode
        ran_s = now - child.started_at
        child.quick_failures = (
            0 if ran_s >= self.settings.stable_after_s else child.quick_failures + 1
        )
        if child.quick_failures >= self.settings.restart_limit:
            log.error(
                "%s exited %d times in a row within %.0fs of its start (last exit code %s): "
                "not restarting it, stopping every service; its output above says why",
                child.name,
                child.quick_failures,
                self.settings.stable_after_s,
                code,
            )
            self.failed = child
            self.stopping = True
            return
        delay = min(30.0, 0.5 * 2**child.quick_failures)
        log.warning("%s exited with %s; restarting in %.1fs", child.name, code, delay)
        child.next_start = now + delay

    def _stop_all(self) -> None:
        alive = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in alive:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_grace_s
        for process in alive:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time: killing it", process.pid)
                process.kill()
