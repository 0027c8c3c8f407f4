"""Several gateway processes on one port (``AEGIS_GATEWAY_PROCESSES``), as real processes.

Which process served a connection is read from the operating system (psutil): the
server process that holds the other end of the client's socket.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from services.gateway.config import AUTO_PROCESSES_MAX, GatewaySettings
from services.gateway.processes import MULTIPROC_ENV, STARTUP_FAILURE
from shared.keys import Keys
from tests.gateway.echo_worker import EchoWorker
from tests.processes import Service, free_port, python_module, wait_for

COMPLETIONS = ("aegis_gateway_requests_total", (("route", "/v1/completions"), ("status", "200")))


class Gateway:
    """A gateway of ``count`` processes started as ``python -m services.gateway``."""

    def __init__(self, env: dict[str, str], tmp_path: Path, count: int) -> None:
        self.port = free_port()
        env = env | {"AEGIS_GATEWAY_PORT": str(self.port), "AEGIS_GATEWAY_PROCESSES": str(count)}
        self.service = Service("gateway", python_module("services.gateway"), env, tmp_path)
        self.count = count

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.service.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def _sockets(self, process: psutil.Process) -> list:
        try:
            return [
                c for c in process.net_connections("tcp") if c.laddr and c.laddr.port == self.port
            ]
        except psutil.NoSuchProcess:
            return []

    def listening(self) -> bool:
        """Every server process listens on the port (the supervisor itself does not)."""
        children = self.children()
        return len(children) == self.count and all(
            any(c.status == psutil.CONN_LISTEN for c in self._sockets(child)) for child in children
        )

    def owner(self, client_port: int) -> int | None:
        """The pid of the server process holding the connection from ``client_port``."""
        for child in self.children():
            for conn in self._sockets(child):
                if conn.raddr and conn.raddr.port == client_port:
                    return child.pid
        return None

    def wait_listening(self) -> None:
        wait_for(self.listening, 60, f"{self.count} processes listening", self.service)


@pytest.fixture
def two(aegis_env: dict[str, str], keys: Keys, tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of two processes with the echo worker answering."""
    worker = EchoWorker(aegis_env["AEGIS_REDIS_URL"], keys).start()
    gateway = Gateway(aegis_env, tmp_path, 2)
    try:
        gateway.wait_listening()
        yield gateway
    finally:
        gateway.service.stop()
        worker.stop()


def _post(conn: http.client.HTTPConnection, prompt: str) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": 4})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    assert response.status == 200, payload
    return dict(json.loads(payload))


def _scrape(gateway: Gateway) -> tuple[int | None, dict]:
    """One /metrics on a new connection: (pid of the process that answered, samples)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
        assert conn.sock is not None
        pid = gateway.owner(conn.sock.getsockname()[1])
    finally:
        conn.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return pid, samples


def test_the_processes_share_the_port_and_every_scrape_sums_them(two: Gateway) -> None:
    connections = [http.client.HTTPConnection("127.0.0.1", two.port, timeout=10) for _ in range(24)]
    try:
        served: dict[int, int | None] = {}
        for index, conn in enumerate(connections):
            prompt = f"process {index}"
            assert _post(conn, prompt)["choices"][0]["text"] == prompt[::-1][:4]
            assert conn.sock is not None
            served[index] = two.owner(conn.sock.getsockname()[1])  # still open: keep-alive
    finally:
        for conn in connections:
            conn.close()
    pids = {child.pid for child in two.children()}
    assert set(served.values()) == pids, served  # both served some, nobody else did
    # The count is written after the answer is sent: wait for the last one, then every
    # process (whichever answers a scrape) must report all 24 and both processes.
    wait_for(lambda: _scrape(two)[1].get(COMPLETIONS) == 24, 10, "24 counted")
    answered: set[int | None] = set()
    for _ in range(60):
        pid, samples = _scrape(two)
        answered.add(pid)
        assert samples[COMPLETIONS] == 24, (pid, samples[COMPLETIONS])
        assert samples[("aegis_gateway_processes", ())] == 2
        assert samples[("aegis_gateway_request_latency_seconds_count",
                        (("route", "/v1/completions"),))] == 24  # fmt: skip
        if answered == pids:
            break
    assert answered == pids, "the scrapes never reached both processes"


def test_sigterm_drains_every_process_and_the_supervisor_exits_0(two: Gateway) -> None:
    children = two.children()
    metrics_dir = Path(children[0].environ()[MULTIPROC_ENV])
    assert metrics_dir.is_dir()
    two.service.process.send_signal(signal.SIGTERM)
    assert two.service.process.wait(30) == 0, two.service.log()
    for child in children:
        assert not child.is_running()
    assert not metrics_dir.exists()
    log = two.service.log()
    assert log.count("stopping: requests still waiting") == 2, log
    assert "gateway stopped" in log


def test_a_process_that_dies_stops_the_whole_gateway(two: Gateway) -> None:
    victim, other = two.children()
    victim.kill()
    code = two.service.process.wait(30)
    assert code != 0, two.service.log()
    assert not other.is_running()
    log = two.service.log()
    assert f"(pid {victim.pid}) exited unexpectedly (killed by SIGKILL)" in log
    assert "gateway stopped after a failure" in log


def test_processes_whose_supervisor_was_killed_drain_and_exit(two: Gateway) -> None:
    children = two.children()
    metrics_dir = children[0].environ()[MULTIPROC_ENV]
    two.service.kill()  # SIGKILL: nothing forwarded, nothing cleaned up
    try:
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, two.service.log()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)  # the supervisor would have
    log = two.service.log()
    assert log.count(f"the gateway supervisor (pid {two.service.process.pid}) is gone") == 2, log
    assert log.count("stopping: requests still waiting") == 2, log


def test_a_port_in_use_stops_the_start(aegis_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = aegis_env | {"AEGIS_GATEWAY_PORT": str(taken.getsockname()[1]),
                           "AEGIS_GATEWAY_PROCESSES": "2"}  # fmt: skip
        gateway = Service("gateway", python_module("services.gateway"), env, tmp_path)
        assert gateway.process.wait(60) == STARTUP_FAILURE
    assert "cannot serve on 127.0.0.1" in gateway.log()
    assert "Started server process" not in gateway.log()


def test_the_process_count_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().gateway_processes == 1
    assert GatewaySettings(gateway_processes=3).resolved_gateway_processes() == 3
    auto = GatewaySettings(gateway_processes=0).resolved_gateway_processes()
    assert 1 <= auto <= min(AUTO_PROCESSES_MAX, os.cpu_count() or 1)
    for bad in ("-1", "65", "two", "1.5"):
        monkeypatch.setenv("AEGIS_GATEWAY_PROCESSES", bad)
        with pytest.raises(ValidationError, match="gateway_processes"):
            GatewaySettings()
