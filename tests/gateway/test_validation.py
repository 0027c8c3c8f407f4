"""Bad input is refused at the edge with OpenAI's error shape; admission and no-model."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.gateway.conftest import GatewayFactory, RunningGateway
from tests.gateway.echo_worker import EchoWorker, model_info

LONG = "x" * 250  # 251 tokens with <s>, against a context of 256

COMPLETION_CASES: list[tuple[str, Any, str, str | None]] = [
    ("wrong type", {"prompt": 5}, "prompt", "prompt"),
    ("missing prompt", {"model": "m"}, "prompt", "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt must not be empty", "prompt"),
    ("empty list", {"prompt": []}, "prompt must not be empty", "prompt"),
    ("empty item", {"prompt": ["a", ""]}, "prompt must not be empty", "prompt"),
    ("max_tokens 0", {"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("max_tokens over limit", {"prompt": "a", "max_tokens": 100}, "at most 50", "max_tokens"),
    ("max_tokens string", {"prompt": "a", "max_tokens": "many"}, "max_tokens", "max_tokens"),
    ("n 0", {"prompt": "a", "n": 0}, "n", "n"),
    ("n over max", {"prompt": "a", "n": 9}, "between 1 and 8", "n"),
    ("temperature high", {"prompt": "a", "temperature": 2.5}, "temperature", "temperature"),
    ("temperature negative", {"prompt": "a", "temperature": -0.1}, "temperature", "temperature"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, "top_p", "top_p"),
    ("top_p above 1", {"prompt": "a", "top_p": 1.5}, "top_p", "top_p"),
    ("five stops", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "at most 4", "stop"),
    ("empty stop", {"prompt": "a", "stop": [""]}, "must not be empty", "stop"),
    ("body not an object", [1, 2], "request body", None),
    ("seed over int64", {"prompt": "a", "seed": 2**64}, "seed", "seed"),
    ("seed just over int64", {"prompt": "a", "seed": 2**63}, "seed", "seed"),
    ("seed under int64", {"prompt": "a", "seed": -(2**63) - 1}, "seed", "seed"),
    ("max_tokens over int32", {"prompt": "a", "max_tokens": 2**40}, "max_tokens", "max_tokens"),
    ("n over 128", {"prompt": "a", "n": 1000}, "n", "n"),
    ("long stop", {"prompt": "a", "stop": "s" * 300}, "at most 256 characters", "stop"),
    ("logprobs range", {"prompt": "a", "logprobs": 6}, "logprobs", "logprobs"),
    ("logprobs asked", {"prompt": "a", "logprobs": 1}, "not supported", "logprobs"),
    ("echo asked", {"prompt": "a", "echo": True}, "not supported", "echo"),
    ("suffix asked", {"prompt": "a", "suffix": "z"}, "not supported", "suffix"),
    ("best_of over n", {"prompt": "a", "best_of": 3}, "not supported", "best_of"),
    (
        "penalty range",
        {"prompt": "a", "presence_penalty": 3},
        "presence_penalty",
        "presence_penalty",
    ),
    (
        "penalty asked",
        {"prompt": "a", "frequency_penalty": 0.5},
        "not supported",
        "frequency_penalty",
    ),
    ("logit_bias range", {"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias", "logit_bias"),
    ("logit_bias asked", {"prompt": "a", "logit_bias": {"5": 1}}, "not supported", "logit_bias"),
    ("user too long", {"prompt": "a", "user": "u" * 300}, "user", "user"),
    ("prompt too long", {"prompt": "y" * 3000}, "prompt is too long: 3000 characters", "prompt"),
    (
        "context exceeded",
        {"prompt": LONG, "max_tokens": 10},
        "maximum context length is 256 tokens. However, you requested 261 tokens "
        "(251 in the prompt, 10 for the completion)",
        "max_tokens",
    ),
]

CHAT_CASES: list[tuple[str, Any, str, str | None]] = [
    ("no messages", {"messages": []}, "messages", "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, "role", "messages"),
    (
        "bad part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages",
        "messages",
    ),
    (
        "empty content",
        {"messages": [{"role": "user", "content": ""}]},
        "must not all be empty",
        "messages",
    ),
    (
        "template refuses",
        {"messages": [{"role": "assistant", "content": "x"}]},
        "must not start with the assistant",
        "messages",
    ),
    (
        "max_completion_tokens 0",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        "max_completion_tokens",
        "max_completion_tokens",
    ),
    (
        "logprobs asked",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True},
        "not supported",
        "logprobs",
    ),
    (
        "top_logprobs range",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21},
        "top_logprobs",
        "top_logprobs",
    ),
    (
        "chat context",
        {"messages": [{"role": "user", "content": LONG}]},
        "maximum context length is 256",
        "max_tokens",
    ),
]


@pytest.fixture
def strict_gateway(module_gateway: RunningGateway) -> RunningGateway:
    """A gateway with ``max_tokens_limit=50``, shared by the module's tests."""
    return module_gateway


def _assert_openai_error(response: Any, status: int, message: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("case", "body", "message", "param"), COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES]
)
def test_bad_completion_bodies_get_400(
    strict_gateway: RunningGateway, case: str, body: Any, message: str, param: str | None
) -> None:
    response = strict_gateway.http.post("/v1/completions", json=body)
    _assert_openai_error(response, 400, message, param)


@pytest.mark.parametrize(
    ("case", "body", "message", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES]
)
def test_bad_chat_bodies_get_400(
    strict_gateway: RunningGateway, case: str, body: Any, message: str, param: str | None
) -> None:
    response = strict_gateway.http.post("/v1/chat/completions", json=body)
    _assert_openai_error(response, 400, message, param)


def test_malformed_json_gets_400(strict_gateway: RunningGateway) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/jobs"):
        response = strict_gateway.http.post(
            path, content=b'{"prompt": "a",', headers={"content-type": "application/json"}
        )
        _assert_openai_error(response, 400, "not valid JSON", None)


def test_unknown_fields_are_ignored_and_context_fits_exactly(
    strict_gateway: RunningGateway,
) -> None:
    body = {"prompt": "x" * 245, "max_tokens": 10, "user": "u", "logit_bias": {}, "frobnicate": 1}
    response = strict_gateway.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] + 10 == 256


def test_redis_down_is_503_not_500(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(redis_url="redis://127.0.0.1:1/0")
    response = gateway.http.post("/v1/completions", json={"prompt": "a"})
    assert response.status_code == 503
    assert "Redis" in response.json()["error"]["message"]
    ready = gateway.http.get("/ready")
    assert ready.status_code == 503
    assert set(ready.json()["failed"]) == {"redis", "workers", "model"}
    assert gateway.http.get("/health").status_code == 200


def test_the_openai_client_raises_bad_request(strict_gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        strict_gateway.openai().completions.create(model="m", prompt="a", temperature=3)


def test_unknown_route_is_404_in_openai_shape(strict_gateway: RunningGateway) -> None:
    response = strict_gateway.http.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_full_queue_is_refused_with_429_and_retry_after(
    start_gateway: GatewayFactory, redis_url: str, keys: Any
) -> None:
    # A model is published but nothing answers: the backlog grows to its bound.
    EchoWorker(redis_url, keys).publish_model()
    gateway = start_gateway(max_queue_depth=2, request_timeout_s=0.5, retry_after_s=3)
    for _ in range(2):
        response = gateway.http.post("/v1/completions", json={"prompt": "a"})
        assert response.status_code == 504  # queued, never answered
        assert response.json()["error"]["code"] == "timeout"
    refused = gateway.http.post("/v1/completions", json={"prompt": "a"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    message = refused.json()["error"]["message"]
    assert "queue is full (2 waiting or running, bound 2, this body needs 1)" in message
    with pytest.raises(openai.RateLimitError):
        gateway.openai().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a"}]
        )


def test_no_model_published_is_503_then_served_once_published(
    start_gateway: GatewayFactory, redis_url: str, keys: Any
) -> None:
    gateway = start_gateway()
    for path, body in (
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
        ("/v1/jobs", {"prompt": "a"}),
    ):
        response = gateway.http.post(path, json=body)
        assert response.status_code == 503
        assert "no worker has loaded a model yet" in response.json()["error"]["message"]
    assert gateway.http.get("/v1/models").json()["data"] == []
    worker = EchoWorker(redis_url, keys, model_info("tiny-real", 128)).start()
    try:
        reply = gateway.openai().completions.create(model="m", prompt="abc", max_tokens=3)
        assert (reply.model, reply.choices[0].text) == ("tiny-real", "cba")
    finally:
        worker.stop()


# Valid JSON escapes that are not text: each must be a 400 naming the field, not a 500.
SURROGATES = [
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"]}', "prompt"),
    ("/v1/completions", '{"prompt": "a", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", '{"prompt": "a", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", '{"prompt": "a", "logit_bias": {"\\ud800": "x"}}', "logit_bias"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
        "messages",
    ),
    ("/v1/jobs", '{"requests": [{"prompt": "\\ud800"}]}', "requests"),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES)
def test_lone_surrogates_get_400_not_500(
    strict_gateway: RunningGateway, path: str, raw: str, param: str
) -> None:
    response = strict_gateway.http.post(
        path, content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "surrogate" in error["message"] or "valid" in error["message"]
    # The connection stays usable (a 500 used to reset it).
    assert strict_gateway.http.get("/health").status_code == 200


def test_the_largest_seed_is_accepted_for_every_sample(strict_gateway: RunningGateway) -> None:
    body = {"prompt": "abc", "max_tokens": 3, "seed": 2**63 - 1, "n": 3}
    response = strict_gateway.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == ["cba"] * 3


def test_nan_is_not_a_temperature(strict_gateway: RunningGateway) -> None:
    response = strict_gateway.http.post(
        "/v1/completions",
        content=b'{"prompt": "a", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    _assert_openai_error(response, 400, "temperature", "temperature")
