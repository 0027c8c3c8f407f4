"""A client retry with the same Idempotency-Key is answered from the first run."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import redis

from shared.keys import Keys
from shared.queue import WorkerQueue
from tests.answers import result
from tests.gateway.conftest import GatewayFactory, RunningGateway
from tests.gateway.echo_worker import EchoWorker

BODY = {"prompt": "abcdef", "max_tokens": 4, "n": 2}


def _generated(client: redis.Redis, keys: Keys) -> int:
    """Sequences answered so far (each final answer sets its done marker first)."""
    return len(list(client.scan_iter(f"{keys.prefix}:done:*")))


def _post(gateway: RunningGateway, key: str, body: dict = BODY, **kw: object) -> httpx.Response:
    return gateway.http.post("/v1/completions", json=body, headers={"Idempotency-Key": key}, **kw)


def test_a_retry_is_answered_from_the_first_run(
    gateway: RunningGateway, redis_client: redis.Redis, keys: Keys
) -> None:
    first = _post(gateway, "retry-1")
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    again = _post(gateway, "retry-1")
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["choices"] == first.json()["choices"]
    assert _generated(redis_client, keys) == 2  # the first run's two choices, nothing more
    other = _post(gateway, "retry-2")
    assert other.json()["id"] != first.json()["id"]
    assert _generated(redis_client, keys) == 4


def test_a_streamed_retry_replays_the_answers(
    gateway: RunningGateway, redis_client: redis.Redis, keys: Keys
) -> None:
    body = {"prompt": "abcdef", "max_tokens": 6, "stream": True}
    texts = []
    for _ in range(2):
        with gateway.http.stream(
            "POST", "/v1/completions", json=body, headers={"Idempotency-Key": "s"}
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines]
        texts.append("".join(c["choices"][0]["text"] for c in chunks if c["choices"]))
    assert texts == ["fedcba", "fedcba"]
    assert _generated(redis_client, keys) == 1


def test_the_same_key_with_another_body_is_400(gateway: RunningGateway) -> None:
    assert _post(gateway, "k").status_code == 200
    reused = _post(gateway, "k", {**BODY, "prompt": "other"})
    assert reused.status_code == 400
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per caller: another bearer token does not see this record.
    elsewhere = gateway.http.post(
        "/v1/completions",
        json={**BODY, "prompt": "other"},
        headers={"Idempotency-Key": "k", "Authorization": "Bearer someone-else"},
    )
    assert elsewhere.status_code == 200


def test_a_bad_key_is_400(gateway: RunningGateway) -> None:
    for key in ("x" * 300, "has space"):
        response = _post(gateway, key)
        assert response.status_code == 400, key
        assert response.json()["error"]["param"] == "Idempotency-Key"


def test_a_client_that_gave_up_is_answered_from_its_first_run(
    start_gateway: GatewayFactory, redis_url: str, keys: Keys, redis_client: redis.Redis
) -> None:
    """The network fails while the request waits; the retry does not run it twice."""
    worker = EchoWorker(redis_url, keys)
    worker.publish_model()
    gateway = start_gateway()
    with pytest.raises(httpx.ReadTimeout):  # no worker yet: the client gives up
        _post(gateway, "net", timeout=0.5)
    assert redis_client.xlen(keys.requests) == 2
    # With a key, the work is kept for the retry: no cancel key.
    assert list(redis_client.scan_iter(f"{keys.prefix}:cancel:*")) == []
    worker.start()
    try:
        retry = _post(gateway, "net")
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert [c["text"] for c in retry.json()["choices"]] == ["fedc", "fedc"]
        assert _generated(redis_client, keys) == 2
    finally:
        worker.stop()


def test_concurrent_retries_share_one_run(
    gateway: RunningGateway, redis_client: redis.Redis, keys: Keys
) -> None:
    body = {"prompt": "SLOW " + "y" * 30, "max_tokens": 30, "stream": False}
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(_post(gateway, "together", body))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["id"] for a in answers}) == 1
    assert _generated(redis_client, keys) == 1


def test_a_retry_of_a_cancelled_run_is_told_so(
    start_gateway: GatewayFactory, redis_url: str, keys: Keys, redis_client: redis.Redis
) -> None:
    EchoWorker(redis_url, keys).publish_model()
    gateway = start_gateway()
    body = {"prompt": "abc", "max_tokens": 3}
    with pytest.raises(httpx.ReadTimeout):
        _post(gateway, "c", body, timeout=0.5)
    worker = WorkerQueue(redis_client, keys, "w")
    delivery = worker.pull(1, block_ms=100)[0]
    request = delivery.request
    worker.publish_result(result(request.id, "c", finish_reason="cancelled"))
    retry = _post(gateway, "c", body)
    assert retry.status_code == 409
    assert retry.json()["error"]["code"] == "request_cancelled"
