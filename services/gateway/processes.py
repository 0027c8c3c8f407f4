"""Several gateway processes on one port: a small supervisor and its server processes.

With ``AEGIS_GATEWAY_PROCESSES`` N > 1, ``python -m services.gateway`` is a supervisor
(no app, no Redis client) that starts N server processes (``python -m services.gateway
--child I --parent PID``). Each is an ordinary gateway: its own event loop, Redis
clients, model cache and :class:`~services.gateway.draining.DrainingServer`.
Everything they must agree on lives in Redis already (admission against the queue
bound, idempotency records, cancel keys, batch jobs, dead letters); metrics are summed
through prometheus-client's multiprocess files (see ``metrics.py``).

**One port, a socket per process.** Each process binds its own listening socket with
``SO_REUSEPORT`` on the same host:port, and the kernel spreads new connections over
them by a hash of each connection. The alternative, one socket bound by the supervisor
and inherited (uvicorn ``--workers``, gunicorn), was not taken because:

- a burst of connections (the benchmark opens 512 at once) is spread evenly. With one
  shared socket, every process is woken for each new connection and whichever runs
  first accepts all that are queued (asyncio accepts up to the backlog per wake-up),
  so one process can take most of a burst while the others idle;
- when the processes stop, their sockets close and the port refuses new connections at
  once (a load balancer moves on), instead of the supervisor's copy of a shared socket
  queueing connections that no process will accept until the supervisor exits.

The risk of ``SO_REUSEPORT``, a second gateway of the same user silently sharing the
port, is closed by the supervisor binding the port first without it: a port in use
stops the start with "address already in use", as it stops a single process. A later
gateway, single or not, fails the same way against this one's sockets.

**Signals and exits.** The server processes run in their own session, so a Ctrl-C at a
terminal reaches the supervisor only. The first SIGTERM or SIGINT is forwarded as
SIGTERM: every process drains as ``DrainingServer`` does (requests still waiting after
``drain_s`` get a 503, the rest is closed at ``shutdown_grace_s``); a second SIGINT is
forwarded as is (uvicorn's forced exit). A process that exits while the supervisor is
not stopping (a crash, a kill, even a clean exit) makes the supervisor stop the others
and exit 1: an operator never has a gateway with some of its processes silently gone.
After a clean stop it exits 0. A server process whose supervisor vanished (SIGKILL)
notices within a second and drains and exits on its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import FrameType

from services.gateway.config import GatewaySettings

log = logging.getLogger(__name__)

# The variable prometheus-client reads (at import) to keep its values in files there.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Past shutdown_grace_s, how long the processes may take to exit before they are killed.
EXIT_MARGIN_S = 5.0
POLL_S = 0.1
PARENT_POLL_S = 1.0
# uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean stop.
CLEAN_EXITS = (0, -signal.SIGTERM)
# As uvicorn's, when the port cannot be bound.
STARTUP_FAILURE = 3


def _family(host: str) -> socket.AddressFamily:
    # As uvicorn decides: an address with a colon is IPv6.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """OSError (address already in use) when something listens on ``host:port``.

    Bound without ``SO_REUSEPORT``, so the port of another gateway's processes counts
    as taken too.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` beside the other processes' (``SO_REUSEPORT``).

    Not listening yet: uvicorn listens on it once the app has started.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def watch_parent(parent: int) -> None:
    """SIGTERM this process (a graceful drain) once its supervisor ``parent`` is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.error("the gateway supervisor (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts ``count`` server processes on the settings' port and watches them."""

    def __init__(self, settings: GatewaySettings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.children: list[_Child] = []
        self.stopping = False
        self.failed = False
        self._signals: list[int] = []
        self._wake = threading.Event()
        self._deadline = float("inf")

    def run(self) -> int:
        """Serve until stopped; the exit status: 0 after a clean stop, else non-zero."""
        host, port = self.settings.gateway_host, self.settings.gateway_port
        if not hasattr(socket, "SO_REUSEPORT"):
            log.error("several gateway processes need SO_REUSEPORT, which this system lacks")
            return STARTUP_FAILURE
        try:
            check_port_free(host, port)
        except OSError as exc:
            log.error("cannot serve on %s:%d: %s", host, port, exc)
            return STARTUP_FAILURE
        # Fresh and empty for every start: files left by an earlier run would be summed.
        metrics_dir = tempfile.mkdtemp(prefix="aegis-gateway-metrics-")
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            self._start(metrics_dir)
            self._watch(metrics_dir)
        finally:
            self._kill_left()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if self.failed:
            log.error("gateway stopped after a failure (exit status 1)")
            return 1
        log.info("gateway stopped")
        return 0

    def _start(self, metrics_dir: str) -> None:
        env = {**os.environ, MULTIPROC_ENV: metrics_dir}
        parent = str(os.getpid())
        for index in range(self.count):
            argv = [sys.executable, "-m", "services.gateway", "--child", str(index),
                    "--parent", parent]  # fmt: skip
            # Own session: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards one SIGTERM (a second SIGINT would make uvicorn exit at once).
            process = subprocess.Popen(argv, env=env, start_new_session=True)
            self.children.append(_Child(index, process))
        log.info(
            "gateway supervisor (pid %d): %d processes on %s:%d, pids %s",
            os.getpid(), self.count, self.settings.gateway_host, self.settings.gateway_port,
            ", ".join(str(child.pid) for child in self.children),
        )  # fmt: skip

    def _watch(self, metrics_dir: str) -> None:
        while True:
            self._handle_signals()
            for child in self.children:
                code = child.process.poll() if child.code is None else None
                if code is not None:
                    self._exited(child, code, metrics_dir)
            alive = [child for child in self.children if child.code is None]
            if not alive:
                return
            if time.monotonic() > self._deadline:
                for child in alive:
                    log.error("gateway process %d (pid %d) did not exit in time: killing it",
                              child.index, child.pid)  # fmt: skip
                    child.process.kill()
                self.failed = True
                self._deadline = float("inf")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _exited(self, child: _Child, code: int, metrics_dir: str) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        child.code = code
        mark_process_dead(child.pid, metrics_dir)
        if not self.stopping:
            log.error("gateway process %d (pid %d) exited unexpectedly (%s): stopping the others",
                      child.index, child.pid, _describe(code))  # fmt: skip
            self.failed = True
            self._stop(signal.SIGTERM)
        elif code not in CLEAN_EXITS:
            log.error("gateway process %d (pid %d) stopped with %s", child.index, child.pid,
                      _describe(code))  # fmt: skip
            self.failed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if not self.stopping:
                log.info("received %s: stopping %d gateway processes",
                         signal.Signals(signum).name, self.count)  # fmt: skip
                self._stop(signal.SIGTERM)
            elif signum == signal.SIGINT:
                log.warning("second SIGINT: the gateway processes exit without draining")
                self._stop(signal.SIGINT)

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self._deadline = time.monotonic() + self.settings.shutdown_grace_s + EXIT_MARGIN_S
        for child in self.children:
            if child.code is None:
                child.process.send_signal(signum)

    def _kill_left(self) -> None:
        """Only after an error in the supervisor itself: no process outlives it."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
