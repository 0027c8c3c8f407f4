"""Redis killed and restarted (AOF) while requests wait: each is answered once, retries too."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from shared.redis_server import answers
from tests.gateway.conftest import GatewayFactory
from tests.gateway.echo_worker import EchoWorker
from tests.processes import free_port, wait_for


class OwnRedis:
    """A redis-server of this test alone, appending every write to its AOF."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv)
        wait_for(lambda: answers(self.url), 10, "redis-server to answer")

    def kill(self) -> None:
        """SIGKILL: what survives is what the AOF had."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _done(url: str, keys: Keys) -> int:
    client = redis.Redis.from_url(url)
    try:
        return len(list(client.scan_iter(f"{keys.prefix}:done:*")))
    finally:
        client.close()


def test_requests_waiting_across_a_redis_restart_are_answered_once(
    start_gateway: GatewayFactory, own_redis: OwnRedis, keys: Keys
) -> None:
    EchoWorker(own_redis.url, keys).publish_model()  # no worker yet: requests wait
    gateway = start_gateway(redis_url=own_redis.url, request_timeout_s=60)
    replies: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        body = {"prompt": f"request {i}", "max_tokens": 9}
        headers = {"Idempotency-Key": f"restart-{i}"}
        replies[i] = httpx.post(
            f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=60
        )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    client = redis.Redis.from_url(own_redis.url)
    wait_for(lambda: client.xlen(keys.requests) == 6, 10, "six queued requests")
    client.close()

    own_redis.kill()
    own_redis.start()  # the stream, the group and the idempotency records come back
    worker = EchoWorker(own_redis.url, keys).start()
    try:
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(replies) == list(range(6))
        for i, reply in replies.items():
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == f"request {i}"[::-1][:9]
        assert _done(own_redis.url, keys) == 6
        # A client that missed its answer retries: answered from the first run.
        for i, first in replies.items():
            body = {"prompt": f"request {i}", "max_tokens": 9}
            again = gateway.http.post(
                "/v1/completions", json=body, headers={"Idempotency-Key": f"restart-{i}"}
            )
            assert again.json()["id"] == first.json()["id"]
            assert again.headers["idempotent-replayed"] == "true"
        assert _done(own_redis.url, keys) == 6
    finally:
        worker.stop()
