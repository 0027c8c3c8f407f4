"""The whole request path through real processes on CPU with ``synthetic:tiny``:
client -> gateway -> Redis stream -> worker -> answer, records in the database."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from shared.db import open_records
from shared.keys import WORKER_GROUP, Keys
from tests.processes import Service, free_port, http_ok, python_module, wait_for

pytestmark = pytest.mark.slow


def _worker(name: str, env: dict[str, str], tmp: Path, **extra: str) -> Service:
    worker_env = {
        **env,
        "AEGIS_WORKER_ID": name,
        "AEGIS_MODEL": "synthetic:tiny",
        "AEGIS_DEVICE": "cpu",
        "AEGIS_WORKER_METRICS_PORT": str(free_port()),
        **extra,
    }
    return Service(name, python_module("services.worker"), worker_env, tmp)


@pytest.fixture
def system_env(aegis_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **aegis_env,
        "AEGIS_DATABASE_URL": f"sqlite:///{tmp_path / 'records.db'}",
        "AEGIS_GATEWAY_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def gateway(system_env: dict[str, str], tmp_path: Path):
    service = Service("gateway", python_module("services.gateway"), system_env, tmp_path)
    base = f"http://127.0.0.1:{system_env['AEGIS_GATEWAY_PORT']}"
    wait_for(http_ok(f"{base}/health"), 60, "gateway health", service)
    yield base
    service.stop()


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completions_are_batched_and_recorded(
    gateway: str, system_env: dict[str, str], tmp_path: Path
) -> None:
    worker = _worker("w-batch", system_env, tmp_path, AEGIS_BATCH_SIZE="16")
    try:
        wait_for(http_ok(f"{gateway}/ready"), 120, "gateway ready (model published)", worker)
        client = _client(gateway)

        def complete(i: int) -> openai.types.Completion:
            return client.completions.create(
                model="any", prompt=f"request {i} " * (1 + i % 7), max_tokens=8, temperature=0
            )

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(complete, range(64)))
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        assert all(a.usage.completion_tokens >= 1 for a in answers)
        assert all(a.model.startswith("synthetic:tiny") for a in answers)
        chat = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        assert chat.choices[0].message.role == "assistant"
        streamed = client.completions.create(
            model="any", prompt="stream me", max_tokens=6, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].text for chunk in streamed if chunk.choices]
        assert len(pieces) >= 2
        worker_metrics = _metrics(f"http://127.0.0.1:{worker.env['AEGIS_WORKER_METRICS_PORT']}")
        answered = sum(
            v for k, v in worker_metrics.items() if k.startswith("aegis_worker_requests_total")
        )
        assert answered == 66
        steps = worker_metrics['aegis_worker_steps_total{worker="w-batch"}']
        assert steps < 66 * 8  # requests shared steps: fewer steps than tokens
        gateway_metrics = _metrics(gateway)
        assert (
            gateway_metrics['aegis_gateway_requests_total{route="/v1/completions",status="200"}']
            == 65
        )
    finally:
        assert worker.stop() == 0, worker.log()
    records = open_records(system_env["AEGIS_DATABASE_URL"])
    cycles = records.fetch("cycles")
    requests = records.fetch("requests")
    assert sum(c["requests_finished"] for c in cycles) == 66  # 64 completions, chat, stream
    assert max(c["batch_size"] for c in cycles) > 1, "64 concurrent requests never shared a step"
    assert len(requests) == 66
    assert all(c["worker_id"] == "w-batch" and c["tokens_generated"] > 0 for c in cycles)


def test_a_killed_worker_loses_no_request(
    gateway: str, system_env: dict[str, str], tmp_path: Path
) -> None:
    fast_reclaim = {
        "AEGIS_VISIBILITY_TIMEOUT_S": "3",
        "AEGIS_CLAIM_REFRESH_S": "0.5",
        "AEGIS_BATCH_SIZE": "8",
    }
    doomed = _worker("w-doomed", system_env, tmp_path, **fast_reclaim)
    wait_for(http_ok(f"{gateway}/ready"), 120, "model published", doomed)
    keys = Keys(system_env["AEGIS_KEY_PREFIX"])
    client = redis.Redis.from_url(system_env["AEGIS_REDIS_URL"])
    openai_client = _client(gateway)

    def complete(i: int) -> str:
        answer = openai_client.completions.create(
            model="any", prompt=f"long job {i}", max_tokens=400, temperature=0
        )
        return answer.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(complete, i) for i in range(16)]
        wait_for(lambda: _pending_of(client, keys, "w-doomed") > 0, 60, "a batch in flight", doomed)
        time.sleep(0.5)
        doomed.kill()
        rescuer = _worker("w-rescuer", system_env, tmp_path, **fast_reclaim)
        try:
            texts = [f.result(timeout=240) for f in futures]
        finally:
            rescuer.stop()
    assert len(texts) == 16
    assert all(text for text in texts)
    records = open_records(system_env["AEGIS_DATABASE_URL"])
    answered_by = {r["worker_id"] for r in records.fetch("requests")}
    assert "w-rescuer" in answered_by


def _metrics(base: str) -> dict[str, float]:
    """``/metrics`` of a service as {'name{labels}': value}."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _pending_of(client: redis.Redis, keys: Keys, worker_id: str) -> int:
    summary = client.xpending(keys.requests, WORKER_GROUP)
    consumers = summary.get("consumers") or []
    return sum(int(c["pending"]) for c in consumers if c["name"].decode().startswith(worker_id))
