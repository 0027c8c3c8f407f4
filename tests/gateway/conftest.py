"""Gateway test fixtures: a real uvicorn server on a free port, the echo worker, clients."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from shared.keys import Keys
from tests.conftest import REDIS_URL
from tests.gateway.echo_worker import EchoWorker
from tests.processes import free_port


@dataclass
class RunningGateway:
    settings: GatewaySettings
    url: str
    http: httpx.Client
    app: FastAPI | None = None  # the running app, for tests that look at its state

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)


class _ServerThread:
    def __init__(self, settings: GatewaySettings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host=settings.gateway_host,
            port=settings.gateway_port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
            log_config=None,  # let uvicorn's errors reach pytest's log capture
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def gateway_settings(key_prefix: str, redis_url: str, tmp_path) -> GatewaySettings:
    return GatewaySettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        data_dir=tmp_path / "data",
        gateway_port=free_port(),
        request_timeout_s=5,
        model_refresh_s=0.2,
    )


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def start_gateway(
    gateway_settings: GatewaySettings, redis_client: object
) -> Iterator[GatewayFactory]:
    """Start a gateway (settings overridable by keyword); stopped after the test."""
    running: list[tuple[_ServerThread, httpx.Client]] = []

    def start(**overrides: object) -> RunningGateway:
        # Validated (not model_copy): comma lists are split, bad values refused.
        settings = GatewaySettings.model_validate(gateway_settings.model_dump() | overrides)
        server = _ServerThread(settings).__enter__()
        url = f"http://{settings.gateway_host}:{settings.gateway_port}"
        http = httpx.Client(base_url=url, timeout=10)
        running.append((server, http))
        return RunningGateway(settings, url, http, server.app)

    yield start
    for server, http in running:
        http.close()
        server.__exit__()


@pytest.fixture(scope="module")
def module_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One gateway + echo worker for a whole module (for many quick checks), own prefix."""
    prefix, redis_url = f"aegis-test-{uuid.uuid4().hex[:10]}", REDIS_URL
    settings = GatewaySettings(
        redis_url=redis_url,
        key_prefix=prefix,
        data_dir=tmp_path_factory.mktemp("data"),
        gateway_port=free_port(),
        request_timeout_s=5,
        max_tokens_limit=50,
        max_prompt_chars=2000,
    )
    worker = EchoWorker(redis_url, Keys(prefix)).start()
    with (
        _ServerThread(settings),
        httpx.Client(base_url=f"http://127.0.0.1:{settings.gateway_port}") as http,
    ):
        yield RunningGateway(settings, f"http://127.0.0.1:{settings.gateway_port}", http)
    worker.stop()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def echo(redis_url: str, keys: Keys) -> Iterator[EchoWorker]:
    worker = EchoWorker(redis_url, keys).start()
    yield worker
    worker.stop()


@pytest.fixture
def gateway(start_gateway: GatewayFactory, echo: EchoWorker) -> RunningGateway:
    """A gateway with the echo worker answering."""
    return start_gateway()
