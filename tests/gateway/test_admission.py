"""Whole-body admission (429 leaves nothing behind) and cancellation through Redis."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.gateway.conftest import GatewayFactory, RunningGateway
from tests.gateway.echo_worker import EchoWorker


def _cancelled(client: redis.Redis, keys: Keys) -> set[str]:
    prefix = f"{keys.prefix}:cancel:"
    return {key.decode().removeprefix(prefix) for key in client.scan_iter(f"{prefix}*")}


def _wait_for(condition, what: str, timeout_s: float = 5) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def idle(start_gateway: GatewayFactory, redis_url: str, keys: Keys) -> RunningGateway:
    """A model is published, but no worker takes anything: the queue only fills."""
    EchoWorker(redis_url, keys).publish_model()
    return start_gateway(max_queue_depth=10, request_timeout_s=0.3, retry_after_s=2)


def test_a_429_leaves_no_half_submitted_body(
    idle: RunningGateway, redis_client: redis.Redis, keys: Keys
) -> None:
    first = idle.http.post("/v1/completions", json={"prompt": "a", "n": 8})
    assert first.status_code == 504  # queued whole, never answered
    assert redis_client.xlen(keys.requests) == 8
    for _ in range(3):
        refused = idle.http.post("/v1/completions", json={"prompt": "a", "n": 8})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "2"
        assert "this body needs 8" in refused.json()["error"]["message"]
        assert redis_client.xlen(keys.requests) == 8  # nothing of it was queued
    fits = idle.http.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert fits.status_code == 504
    assert redis_client.xlen(keys.requests) == 10
    chat = idle.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.status_code == 429


def test_a_body_larger_than_the_bound_is_400(idle: RunningGateway) -> None:
    response = idle.http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 4})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_sequences"


def test_a_passed_deadline_cancels_the_work(
    idle: RunningGateway, redis_client: redis.Redis, keys: Keys
) -> None:
    response = idle.http.post("/v1/completions", json={"prompt": "a", "n": 2})
    assert response.status_code == 504
    request_ids = {f"{json.loads(e[1][b'data'])['id']}" for e in redis_client.xrange(keys.requests)}
    _wait_for(lambda: _cancelled(redis_client, keys) == request_ids, "no cancel keys")
    assert redis_client.ttl(keys.cancel(next(iter(request_ids)))) > 0


def test_a_client_that_leaves_a_plain_request_cancels_it(
    start_gateway: GatewayFactory, redis_url: str, keys: Keys, redis_client: redis.Redis
) -> None:
    EchoWorker(redis_url, keys).publish_model()
    gateway = start_gateway(request_timeout_s=30)
    with pytest.raises(httpx.ReadTimeout):
        gateway.http.post("/v1/completions", json={"prompt": "a", "n": 3}, timeout=0.5)
    _wait_for(lambda: len(_cancelled(redis_client, keys)) == 3, "no cancel keys after leaving")
    queued = {json.loads(e[1][b"data"])["id"] for e in redis_client.xrange(keys.requests)}
    assert _cancelled(redis_client, keys) == queued


def test_a_client_that_leaves_a_stream_cancels_it(
    gateway: RunningGateway, echo: EchoWorker, redis_client: redis.Redis, keys: Keys
) -> None:
    body = {"prompt": "SLOW " + "z" * 120, "max_tokens": 120, "stream": True}
    with (
        httpx.Client(base_url=gateway.url, timeout=5) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        chunk = json.loads(next(response.iter_lines()).removeprefix("data: "))
    request_id = f"{chunk['id']}-0"
    _wait_for(lambda: _cancelled(redis_client, keys) == {request_id}, "no cancel key")
    # The worker saw it at its next step and stopped generating.
    _wait_for(lambda: echo.cancelled == [request_id], "the worker did not stop")
    finished = gateway.http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    assert finished.json()["choices"][0]["text"] == "cba"
    assert _cancelled(redis_client, keys) == {request_id}  # answered requests are not cancelled
