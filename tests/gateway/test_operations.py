"""Health, readiness, metrics, model reloads and clients that go away mid-stream."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from shared.queue import WorkerQueue
from tests.conftest import POSTGRES_URL
from tests.gateway.conftest import GatewayFactory, RunningGateway, free_port
from tests.gateway.echo_worker import EchoWorker, model_info


def _samples(gateway: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = gateway.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_health_answers_while_the_process_lives(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()  # no model, no worker: still alive
    response = gateway.http.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_ready_needs_redis_a_live_worker_and_its_model(
    start_gateway: GatewayFactory, redis_url: str, keys: Keys, redis_client
) -> None:
    gateway = start_gateway()
    waiting = gateway.http.get("/ready")
    assert waiting.status_code == 503
    assert waiting.json()["failed"] == ["workers", "model"]
    assert "no worker has loaded a model yet" in waiting.json()["checks"]["model"]["detail"]
    assert waiting.json()["checks"]["database"]["ok"] is True  # embedded SQLite
    worker = EchoWorker(redis_url, keys)
    # A model key left by an earlier run, but no worker alive: not able to serve.
    worker.publish_model()
    stale = gateway.http.get("/ready")
    assert (stale.status_code, stale.json()["failed"]) == (503, ["workers"])
    assert "no live worker heartbeat" in stale.json()["checks"]["workers"]["detail"]
    worker.register()
    ready = gateway.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert ready.json()["checks"]["model"]["detail"] == "synthetic:tiny"
    # The heartbeat key expires (or is deleted) when the worker dies.
    redis_client.delete(keys.worker_alive("echo-1"))
    assert gateway.http.get("/ready").json()["failed"] == ["workers"]


def test_a_database_outage_is_reported_but_does_not_make_the_gateway_unready(
    start_gateway: GatewayFactory, echo: EchoWorker
) -> None:
    down = start_gateway(database_url="postgresql://postgres@127.0.0.1:1/none")
    response = down.http.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json()["failed"] == []
    assert response.json()["degraded"] == ["database"]
    assert response.json()["checks"]["database"]["ok"] is False
    up = start_gateway(gateway_port=free_port(), database_url=POSTGRES_URL)
    ready = up.http.get("/ready").json()
    assert (ready["degraded"], ready["checks"]["database"]["ok"]) == ([], True)


def test_metrics_count_requests_tokens_and_timings(
    start_gateway: GatewayFactory, echo: EchoWorker
) -> None:
    gateway = start_gateway(max_tokens_limit=10)
    client = gateway.openai()
    client.completions.create(model="m", prompt="abcdef", max_tokens=4)
    list(client.completions.create(model="m", prompt="abcdef", max_tokens=6, stream=True))
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    gateway.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 99})
    samples = _samples(gateway)
    requests = "aegis_gateway_requests_total"
    assert samples[(requests, (("route", "/v1/completions"), ("status", "200")))] == 2
    assert samples[(requests, (("route", "/v1/chat/completions"), ("status", "200")))] == 1
    assert samples[(requests, (("route", "/v1/completions"), ("status", "400")))] == 1
    assert samples[("aegis_gateway_tokens_generated_total", ())] == 4 + 6 + 3
    assert samples[("aegis_gateway_time_to_first_token_seconds_count", ())] == 3
    assert samples[("aegis_gateway_queue_wait_seconds_count", ())] == 3
    assert samples[("aegis_gateway_queue_depth", ())] == 0
    latency = ("aegis_gateway_request_latency_seconds_count", (("route", "/v1/completions"),))
    assert samples[latency] == 3


def test_a_new_published_model_is_picked_up(
    gateway: RunningGateway, redis_client, keys: Keys
) -> None:
    assert [m["id"] for m in gateway.http.get("/v1/models").json()["data"]] == ["synthetic:tiny"]
    redis_client.set(keys.model_info, model_info("org/real-model", 64).model_dump_json())
    deadline = time.monotonic() + 3
    while gateway.http.get("/v1/models").json()["data"][0]["id"] != "org/real-model":
        assert time.monotonic() < deadline, "the new model was not picked up"
        time.sleep(0.05)
    card = gateway.http.get("/v1/models").json()["data"][0]
    assert (card["synthetic"], card["context_length"]) == (False, 64)
    # Garbage published later keeps the last good model in service.
    redis_client.set(keys.model_info, "{not json")
    time.sleep(0.3)
    reply = gateway.openai().completions.create(model="m", prompt="ab", max_tokens=2)
    assert (reply.model, reply.choices[0].text) == ("org/real-model", "ba")


def test_a_client_leaving_mid_stream_harms_nothing(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # 40 deltas 50 ms apart: the whole stream would take about 2 s.
    body = {"prompt": "SLOW " + "z" * 120, "max_tokens": 120, "stream": True}
    started = time.monotonic()
    # Leaving the block closes the connection before the stream ends.
    with (
        httpx.Client(base_url=gateway.url, timeout=5) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
    counted = ("aegis_gateway_requests_total", (("route", "/v1/completions"), ("status", "200")))
    while _samples(gateway).get(counted) != 1:
        assert time.monotonic() - started < 5, "the abandoned stream never ended"
        time.sleep(0.05)
    # The gateway noticed and ended the request well before the worker's stream ended.
    assert time.monotonic() - started < 1.5
    for _ in range(3):
        reply = gateway.openai().completions.create(model="m", prompt="still here", max_tokens=4)
        assert reply.choices[0].text == "ereh"
    assert gateway.http.get("/health").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_gateway_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, services.gateway.__main__, services.gateway.jobs; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_dead_letter_reaches_its_client_the_api_and_the_metrics(
    start_gateway: GatewayFactory, redis_url: str, keys: Keys
) -> None:
    EchoWorker(redis_url, keys).publish_model()
    gateway = start_gateway(api_keys="k")
    auth = {"Authorization": "Bearer k"}
    client = redis.Redis.from_url(redis_url)
    queue = WorkerQueue(client, keys, "poisoned")

    def give_up() -> None:  # what a worker does after the last failed delivery
        deliveries: list = []
        while not deliveries:
            deliveries = queue.pull(1, block_ms=100)
        deliveries[0].deliveries = 5
        queue.dead_letter(deliveries[0], "ValueError: Overflow when unpacking long long", "m", "w1")

    thread = threading.Thread(target=give_up)
    thread.start()
    answer = gateway.http.post("/v1/completions", json={"prompt": "poison"}, headers=auth)
    thread.join(timeout=5)
    client.close()
    assert answer.status_code == 500
    message = answer.json()["error"]["message"]
    assert "failed 5 deliveries" in message and "Overflow" in message
    assert gateway.http.get("/v1/dead_letters").status_code == 401
    listed = gateway.http.get("/v1/dead_letters", headers=auth).json()
    assert listed["total"] == 1
    letter = listed["data"][0]
    assert (letter["prompt_preview"], letter["deliveries"], letter["worker_id"]) == (
        "poison", 5, "w1",
    )  # fmt: skip
    assert _samples(gateway)[("aegis_dead_letters", ())] == 1


def test_the_openapi_document_declares_the_errors_it_answers(gateway: RunningGateway) -> None:
    document = gateway.http.get("/openapi.json").json()
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    completions = document["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "500", "503", "504"} <= set(
        completions["responses"]
    )
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    headers = [p["name"] for p in completions["parameters"] if p["in"] == "header"]
    assert headers == ["Idempotency-Key"]
    assert "/v1/models/{model_id}" in document["paths"]
    assert "/v1/dead_letters" in document["paths"]
