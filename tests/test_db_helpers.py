"""Fixtures and builders for the records tests (no tests here).

``db`` is parametrized over both backends: SQLite in ``tmp_path`` and Postgres (the
``postgres_url`` fixture) in a unique schema dropped afterwards. :class:`TcpProxy` puts a
real, switchable network path in front of Postgres, so an outage is a real one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from shared.db import Records, open_records
from shared.schemas import (
    ControlSettings,
    CycleStats,
    Decision,
    DecisionAction,
    GpuSample,
    OomEvent,
    RequestRecord,
    TelemetrySample,
    WorkerInfo,
)


@dataclass
class DbTarget:
    """Where a test's records live."""

    kind: str
    url: str
    schema: str | None = None

    def open(self, **kwargs: float) -> Records:
        return open_records(self.url, schema=self.schema, **kwargs)

    def opener(self, url: str | None = None, timeout_s: float = 5.0) -> Callable[[], Records]:
        return partial(open_records, url or self.url, schema=self.schema, timeout_s=timeout_s)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str) -> Iterator[DbTarget]:
    if request.param == "sqlite":
        yield DbTarget("sqlite", f"sqlite:///{tmp_path / 'records' / 'aegis.db'}")
    else:
        with _postgres_target(postgres_url) as target:
            yield target


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[DbTarget]:
    """Postgres only, in a unique schema dropped afterwards."""
    with _postgres_target(postgres_url) as target:
        yield target


@contextlib.contextmanager
def _postgres_target(postgres_url: str) -> Iterator[DbTarget]:
    schema = f"aegis_test_{uuid.uuid4().hex[:10]}"
    try:
        yield DbTarget("postgres", postgres_url, schema)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
            conn.execute(drop.format(sql.Identifier(schema)))


def url_via_port(url: str, port: int) -> str:
    """``url`` with its host:port replaced by 127.0.0.1:``port`` (user kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


class TcpProxy:
    """A TCP forwarder to ``target`` that can be switched down (refusing and cutting every
    connection) and up again: a database outage without touching the database."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            self._cut_all()

    def close(self) -> None:
        self._closed = True
        self._cut_all()
        self._server.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()

    def _cut_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(postgres_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    yield proxy
    proxy.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- builders: every field set to a non-default value ----------------------------------------


def cycle(ts: float, worker_id: str = "w0", **overrides: object) -> CycleStats:
    fields: dict[str, object] = dict(
        ts=ts,
        worker_id=worker_id,
        gpu_index=1,
        settings_version=3,
        settings_reason="grow",
        batch_size=8,
        max_prompt_len=120,
        mean_prompt_len=80.5,
        max_new_tokens=64,
        precision="fp16",
        max_seq_len=1024,
        tokens_generated=512,
        tokens_per_s=1234.5,
        latency_s=0.42,
        latency_p50_s=0.4,
        latency_p95_s=0.5,
        padding_ratio=0.25,
        memory_allocated_bytes=3 << 30,
        memory_peak_bytes=5 << 30,
        memory_reserved_bytes=6 << 30,
        nvml_used_bytes=70 << 30,
        nvml_total_bytes=80 << 30,
        gpu_utilization_pct=97.5,
        queue_depth=12,
        oom_events=1,
    )
    fields.update(overrides)
    return CycleStats.model_validate(fields)


def request_record(
    ts: float, worker_id: str = "w0", request_id: str | None = None
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id or uuid.uuid4().hex,
        worker_id=worker_id,
        kind="chat",
        prompt_tokens=17,
        completion_tokens=9,
        finish_reason="length",
        queued_at=ts - 1.0,
        started_at=ts - 0.5,
        first_token_at=ts - 0.4,
        finished_at=ts,
        settings_version=4,
    )


def decision(ts: float, worker_id: str = "w0") -> Decision:
    before = ControlSettings(
        version=4,
        batch_size=16,
        max_seq_len=2048,
        precision="bf16",
        reason="initial",
        updated_at=ts - 10,
    )
    after = before.model_copy(
        update={
            "version": 5,
            "batch_size": 8,
            "max_seq_len": 1024,
            "precision": "fp16",
            "reason": "shrink",
        }
    )
    return Decision(
        ts=ts,
        worker_id=worker_id,
        action=DecisionAction.SHRINK,
        reason="memory 91% > 85%",
        before=before,
        after=after,
        inputs={"memory_frac": 0.91, "batch": 16, "note": "x", "gpu": None},
    )


def oom(ts: float, worker_id: str = "w0") -> OomEvent:
    return OomEvent(
        ts=ts,
        worker_id=worker_id,
        gpu_index=0,
        batch_size=32,
        max_prompt_len=900,
        max_new_tokens=128,
        precision="bf16",
        settings_version=6,
        recovered=True,
        action="split batch 32 -> 2x16",
        message="CUDA out of memory",
    )


def telemetry(ts: float, gpus: int = 2, host: str = "node1") -> TelemetrySample:
    return TelemetrySample(
        ts=ts,
        host=host,
        gpu="nvml" if gpus else "none",
        gpus=[
            GpuSample(
                index=i,
                name=f"H100-{i}",
                memory_used_bytes=(10 + i) << 30,
                memory_total_bytes=80 << 30,
                utilization_pct=50.0 + i,
                temperature_c=60.0 + i,
                power_w=300.0 + i,
                process_memory_bytes={1234: 5 << 30},
            )
            for i in range(gpus)
        ],
        host_memory_used_bytes=20 << 30,
        host_memory_total_bytes=128 << 30,
        cpu_pct=37.5,
        note=None if gpus else "no GPU: host metrics only",
    )


def worker(worker_id: str = "w0", pid: int = 4242, started_at: float = 1000.0) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        host="node1",
        pid=pid,
        device="cuda:0",
        gpu_index=0,
        gpu_name="H100",
        model="synthetic:tiny",
        synthetic=True,
        started_at=started_at,
    )
