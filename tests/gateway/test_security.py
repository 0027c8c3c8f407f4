"""API keys (401 in OpenAI's shape, constant-time compare) and the body size limit (413)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from services.gateway.security import ApiKeyAuth
from tests.gateway.conftest import GatewayFactory, RunningGateway
from tests.gateway.echo_worker import EchoWorker

KEYS = "key-one,key-two"


@pytest.fixture
def locked(start_gateway: GatewayFactory, echo: EchoWorker) -> RunningGateway:
    return start_gateway(api_keys=KEYS)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [{}, _bearer("key-three"), _bearer("key-one-and-more"), {"Authorization": "key-one"}],
    ids=["none", "wrong", "prefix", "no scheme"],
)
def test_v1_needs_one_of_the_keys(locked: RunningGateway, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/dead_letters"), ("GET", "/v1/nothing")):  # fmt: skip
        response = locked.http.request(method, path, headers=headers, json={"prompt": "a"})
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


def test_every_configured_key_is_accepted(locked: RunningGateway) -> None:
    for key in ("key-one", "key-two"):
        response = locked.http.post(
            "/v1/completions", json={"prompt": "abc", "max_tokens": 3}, headers=_bearer(key)
        )
        assert response.status_code == 200, response.text
    client = openai.OpenAI(base_url=f"{locked.url}/v1", api_key="key-two", max_retries=0)
    assert client.completions.create(model="m", prompt="ab", max_tokens=2).choices[0].text == "ba"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked.url}/v1", api_key="nope", max_retries=0).models.list()


def test_operations_endpoints_are_open_unless_configured(
    start_gateway: GatewayFactory, echo: EchoWorker
) -> None:
    open_ops = start_gateway(api_keys=KEYS)
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert open_ops.http.get(path).status_code == 200, path
    closed = start_gateway(api_keys=KEYS, auth_operations=True, gateway_port=_port())
    for path in ("/health", "/ready", "/metrics"):
        assert closed.http.get(path).status_code == 401, path
        assert closed.http.get(path, headers=_bearer("key-one")).status_code == 200, path


def _port() -> int:
    from tests.processes import free_port

    return free_port()


def test_no_keys_means_no_authentication(gateway: RunningGateway) -> None:
    assert gateway.http.get("/v1/models").status_code == 200


def test_keys_are_compared_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr("services.gateway.security.hmac.compare_digest", spy)
    auth = ApiKeyAuth(app=None, keys=["k1", "k2"])  # type: ignore[arg-type]
    assert auth.accepts(b"k1")
    # Every key is compared even after a match: no early exit to time.
    assert calls == [(b"k1", b"k1"), (b"k1", b"k2")]
    assert not auth.accepts(None)


def test_a_body_over_the_limit_is_413_before_parsing(
    start_gateway: GatewayFactory, echo: EchoWorker
) -> None:
    gateway = start_gateway(max_body_bytes=2048)
    big = b'{"prompt": "' + b"x" * 4000 + b'"}'
    declared = gateway.http.post(
        "/v1/completions", content=big, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    chunked = gateway.http.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    small = b'{"prompt": "abc", "max_tokens": 3}'

    def small_chunks() -> Iterator[bytes]:
        yield small[:10]
        yield small[10:]

    fine = gateway.http.post(
        "/v1/completions", content=small_chunks(), headers={"content-type": "application/json"}
    )
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["text"] == "cba"
    assert httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "abc"}).status_code == 200
