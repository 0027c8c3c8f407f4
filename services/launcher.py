"""``aegis run``: start every service as a local process and supervise them.

The same services as the Docker Compose deployment, on the embedded defaults: SQLite
under the data dir, Redis at ``AEGIS_REDIS_URL`` (a local ``redis-server`` is started
when none answers). A service that dies is restarted with a back-off; Ctrl-C or
SIGTERM stops them all gracefully (the worker finishes or hands back its batch).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import CommonSettings
from shared.keys import Keys
from shared.logs import setup_logging
from shared.redis_server import RedisUnavailable, ensure_redis

log = logging.getLogger("aegis.launcher")

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway", "worker", "monitor", "agent", "jobs", "dashboard")
STOP_GRACE_S = 30.0


@dataclass
class Child:
    """One supervised service process."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, cwd=ROOT)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)


def service_argv(name: str, settings: CommonSettings) -> list[str]:
    """The command line that runs one service with this interpreter."""
    python = sys.executable
    if name == "jobs":
        queue = Keys(settings.key_prefix).rq_queue
        return [python, "-m", "rq.cli", "worker", "--url", settings.redis_url, "--quiet", queue]
    return [python, "-m", f"services.{name}"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aegis", description="AEGIS Runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the whole system as local processes")
    run.add_argument("--only", nargs="+", choices=SERVICES, help="start just these services")
    run.add_argument("--without", nargs="+", choices=SERVICES, default=[], help="leave these out")
    sub.add_parser("bench", help="run the benchmark suite: aegis bench --help")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # its own CLI parses the rest
        from experiments.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = parse_args(argv)
    settings = CommonSettings()
    setup_logging(settings.log_level, settings.log_json, "launcher")
    names = [n for n in (args.only or SERVICES) if n not in args.without]
    try:
        redis_process = ensure_redis(settings.redis_url, settings.data_dir / "redis")
    except RedisUnavailable as exc:
        log.error("%s", exc)
        return 2
    try:
        return Supervisor([Child(n, service_argv(n, settings)) for n in names]).run()
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)


class Supervisor:
    """Keeps the children running until asked to stop, then stops them in order."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def _ask_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping services", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._ask_stop)
        signal.signal(signal.SIGTERM, self._ask_stop)
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        for child in self.children:
            child.start()
        while not self.stopping:
            self._restart_dead()
            time.sleep(0.5)
        self._stop_all()
        return 0

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            if child.next_start == 0.0:
                # Back off exponentially, but forgive a service that ran for a while.
                ran_s = now - child.started_at
                child.restarts = 0 if ran_s > 60 else child.restarts + 1
                delay = min(30.0, 0.5 * 2**child.restarts)
                log.warning(
                    "%s exited with %s; restarting in %.1fs",
                    child.name,
                    child.process.returncode,
                    delay,
                )
                child.next_start = now + delay
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()

    def _stop_all(self) -> None:
        alive = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in alive:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in alive:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time: killing it", process.pid)
                process.kill()
