"""Start AEGIS services as real processes for end-to-end tests, and stop them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A service process whose output goes to a log file under the test's tmp dir."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to finish or hand anything back."""
        self.process.kill()
        self.process.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return int(self.process.returncode)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, service: Service | None = None
) -> None:
    """Poll ``condition`` until true; fail with the service's log when it never is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if service is not None and not service.alive():
            raise AssertionError(
                f"{service.name} exited while waiting for {what}:\n{service.log()}"
            )
        time.sleep(0.2)
    detail = f"\n--- {service.name} log ---\n{service.log()}" if service else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check
