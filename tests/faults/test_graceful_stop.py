"""SIGTERM under load: every waiting client gets an OpenAI-shaped answer, none a plain 500."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.gateway.echo_worker import EchoWorker
from tests.processes import Service, free_port, http_ok, python_module, wait_for


def _cancelled(client: redis.Redis, keys: Keys) -> set[str]:
    prefix = f"{keys.prefix}:cancel:"
    return {key.decode().removeprefix(prefix) for key in client.scan_iter(f"{prefix}*")}


# 2: a supervisor forwards the SIGTERM to two server processes, each drains its own.
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_answers_every_waiting_request_before_the_deadline(
    aegis_env: dict[str, str],
    keys: Keys,
    redis_client: redis.Redis,
    tmp_path: Path,
    processes: int,
) -> None:
    # A model is published but no worker runs: every request waits until the stop.
    EchoWorker(aegis_env["AEGIS_REDIS_URL"], keys).publish_model()
    port = free_port()
    env = aegis_env | {
        "AEGIS_GATEWAY_PORT": str(port), "AEGIS_DRAIN_S": "1", "AEGIS_SHUTDOWN_GRACE_S": "4",
        "AEGIS_GATEWAY_PROCESSES": str(processes),
    }  # fmt: skip
    gateway = Service("gateway", python_module("services.gateway"), env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{url}/health"), 30, "the gateway", gateway)
    answers: dict[str, httpx.Response | str] = {}

    def plain(name: str, headers: dict[str, str]) -> None:
        body = {"prompt": name, "max_tokens": 2}
        answers[name] = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)

    def streamed() -> None:
        body = {"prompt": "streamed", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            answers["streamed"] = "\n".join(response.iter_lines())

    threads = [
        threading.Thread(target=plain, args=("one", {})),
        threading.Thread(target=plain, args=("two", {})),
        threading.Thread(target=plain, args=("kept", {"Idempotency-Key": "keep-me"})),
        threading.Thread(target=streamed),
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: redis_client.xlen(keys.requests) == 4, 10, "all four queued", gateway)
    entries = redis_client.xrange(keys.requests)
    ids = {json.loads(fields[b"data"])["prompt"]: json.loads(fields[b"data"])["id"]
           for _, fields in entries}  # fmt: skip
    gateway.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=10)
    # uvicorn re-raises the SIGTERM it handled once it is done: -15 is a clean stop; the
    # supervisor of several processes exits 0.
    clean = (0, -signal.SIGTERM) if processes == 1 else (0,)
    assert gateway.process.wait(10) in clean, gateway.log()

    for name in ("one", "two", "kept"):
        response = answers[name]
        assert isinstance(response, httpx.Response)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "shutting_down"
    assert "retry it" in answers["one"].json()["error"]["message"]  # type: ignore[union-attr]
    assert "same Idempotency-Key" in answers["kept"].json()["error"]["message"]  # type: ignore[union-attr]
    stream = answers["streamed"]
    assert isinstance(stream, str) and '"code":"shutting_down"' in stream
    assert stream.rstrip().endswith("data: [DONE]")
    # Work nobody waits for any more is cancelled; the keyed one is kept for its retry.
    wait_for(lambda: len(_cancelled(redis_client, keys)) == 3, 5, "cancel keys")
    assert _cancelled(redis_client, keys) == {ids["one"], ids["two"], ids["streamed"]}
    log = gateway.log()
    assert "Cancel" not in log  # uvicorn never had to cut a request off
    assert "could not cancel" not in log
