"""Real text through the whole system: the README's run, without the model hub.

Gateway and worker run as processes with the default model and nothing in the hub cache,
as on a fresh machine without network: the worker serves the packaged SmolLM2, says it
is a fallback, and the README's kind of question gets a real answer.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from services.worker.packaged import PACKAGED_MODEL
from shared.config import DEFAULT_MODEL
from tests.processes import Service, free_port, http_ok, python_module, wait_for

pytestmark = pytest.mark.slow

FALLBACK_NAME = f"{PACKAGED_MODEL} (fallback for {DEFAULT_MODEL})"


@pytest.fixture
def system(aegis_env: dict[str, str], tmp_path: Path, model_cache: Path):
    env = {
        **aegis_env,
        "AEGIS_DATABASE_URL": f"sqlite:///{tmp_path / 'records.db'}",
        "AEGIS_GATEWAY_PORT": str(free_port()),
        "AEGIS_MODEL": DEFAULT_MODEL,  # what an unset AEGIS_MODEL means
        "AEGIS_MODEL_CACHE_DIR": str(model_cache),
        "AEGIS_DEVICE": "cpu",
        "AEGIS_WORKER_METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),  # TinyLlama is not cached here
        "OMP_NUM_THREADS": "1",
    }
    gateway = Service("gateway", python_module("services.gateway"), env, tmp_path)
    worker = Service("worker", python_module("services.worker"), env, tmp_path)
    base = f"http://127.0.0.1:{env['AEGIS_GATEWAY_PORT']}"
    try:
        wait_for(http_ok(f"{base}/ready"), 180, "model published", worker)
        yield base
    finally:
        worker.stop()
        gateway.stop()


def ask(client: openai.OpenAI, question: str, max_tokens: int) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
    )


def streamed(client: openai.OpenAI, question: str, max_tokens: int) -> str:
    chunks = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_without_the_hub_the_default_run_answers_with_real_text(system: str) -> None:
    [card] = httpx.get(f"{system}/v1/models", timeout=10).json()["data"]
    assert (card["id"], card["synthetic"]) == (FALLBACK_NAME, False)
    client = openai.OpenAI(base_url=f"{system}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = ask(client, "What is the capital of France?", 30)
    assert answer.model == FALLBACK_NAME
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"
    # Streamed over SSE, multi-byte characters included, the text is the same answer.
    for question, max_tokens in [
        ("How do you say 'coffee' in French?", 30),
        ("Write a short happy birthday message with emojis.", 39),
    ]:
        whole = ask(client, question, max_tokens).choices[0].message.content or ""
        assert any(ord(ch) > 127 for ch in whole) and "\ufffd" not in whole, whole
        assert streamed(client, question, max_tokens) == whole
