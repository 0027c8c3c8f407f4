"""Fixtures shared by every test: a real Redis and a real Postgres, isolated per test.

Each test gets its own key prefix, so tests (and parallel test runs) never see each
other's streams; everything under the prefix is deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from shared.keys import Keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REDIS_URL = os.environ.get("AEGIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "AEGIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def postgres_url() -> str:
    return POSTGRES_URL


@pytest.fixture
def key_prefix() -> str:
    return f"aegis-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def redis_client(key_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    for key in client.scan_iter(f"{key_prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def aegis_env(monkeypatch: pytest.MonkeyPatch, key_prefix: str, tmp_path) -> dict[str, str]:
    """Environment for AEGIS processes and settings classes started by a test."""
    env = {
        "AEGIS_REDIS_URL": REDIS_URL,
        "AEGIS_KEY_PREFIX": key_prefix,
        "AEGIS_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
