"""Clients that leave: the real worker stops generating for them (gateway -> Redis -> core)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import WORKER_GROUP, Keys
from shared.queue import parse_event
from shared.schemas import GenerationResult
from tests.processes import Service, free_port, http_ok, python_module, wait_for

pytestmark = pytest.mark.slow

# Near the tiny model's context (512): long enough to be cut short by the cancel.
LONG = {"prompt": "tell me everything", "max_tokens": 480, "ignore_eos": True}


def _final(client: redis.Redis, keys: Keys, request_id: str) -> GenerationResult | None:
    for _, fields in client.xrange(keys.result(request_id)):
        event = parse_event(fields)
        if isinstance(event, GenerationResult):
            return event
    return None


def _leave_once_pulled(port: int, client: redis.Redis, keys: Keys) -> None:
    """Send a plain completion, and close the connection as soon as a worker holds it."""
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not client.xpending(keys.requests, WORKER_GROUP)["pending"]:
            assert time.monotonic() < deadline, "no worker took the plain request"
            time.sleep(0.005)


def _assert_cancelled(client: redis.Redis, keys: Keys, request_id: str, worker: Service) -> None:
    """The worker answered ``request_id`` with a cancelled result, short of its budget."""
    wait_for(lambda: request_id in _cancel_keys(client, keys), 10, f"{request_id} cancelled")
    wait_for(lambda: _final(client, keys, request_id) is not None, 60,
             f"the final result of {request_id}", worker)  # fmt: skip
    final = _final(client, keys, request_id)
    assert final is not None
    assert final.finish_reason == "cancelled", final
    assert final.completion_tokens < LONG["max_tokens"]


def _cancel_keys(client: redis.Redis, keys: Keys) -> set[str]:
    prefix = f"{keys.prefix}:cancel:"
    return {key.decode().removeprefix(prefix) for key in client.scan_iter(f"{prefix}*")}


def test_leaving_a_stream_or_a_plain_request_cancels_its_generation(
    aegis_env: dict[str, str], keys: Keys, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    env = aegis_env | {"AEGIS_GATEWAY_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "AEGIS_DATABASE_URL": f"sqlite:///{tmp_path / 'records.db'}"}  # fmt: skip
    worker_env = env | {
        "AEGIS_WORKER_ID": "w-cancel", "AEGIS_MODEL": "synthetic:tiny", "AEGIS_DEVICE": "cpu",
        "AEGIS_WORKER_METRICS_PORT": str(free_port()),
    }  # fmt: skip
    gateway = Service("gateway", python_module("services.gateway"), env, tmp_path)
    worker = Service("worker", python_module("services.worker"), worker_env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(http_ok(f"{url}/ready"), 120, "a ready gateway and worker", worker)
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response,
        ):
            assert response.status_code == 200, response.read()
            first = next(line for line in response.iter_lines() if line.startswith("data: {"))
        streamed = f"{json.loads(first.removeprefix('data: '))['id']}-0"
        _assert_cancelled(redis_client, keys, streamed, worker)
        # Now nothing is pending: the next entry a worker holds is the plain request.
        wait_for(lambda: redis_client.xpending(keys.requests, WORKER_GROUP)["pending"] == 0,
                 10, "the streamed request acked")  # fmt: skip
        _leave_once_pulled(port, redis_client, keys)
        wait_for(lambda: len(_cancel_keys(redis_client, keys)) == 2, 10, "a second cancel key")
        (plain,) = _cancel_keys(redis_client, keys) - {streamed}
        _assert_cancelled(redis_client, keys, plain, worker)
    finally:
        worker.stop()
        gateway.stop()
