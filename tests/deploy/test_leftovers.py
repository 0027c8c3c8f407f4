"""State an earlier run left in Redis is reported, and ``--fresh`` clears it (issue 9.7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from rq import Queue

from services.launcher import clear_state, find_leftovers
from shared.control import ControlStore
from shared.keys import WORKER_GROUP, Keys
from shared.queue import ensure_group
from shared.schemas import ControlSettings, ModelInfo, dump


@pytest.fixture(autouse=True)
def _empty_jobs_queue(redis_client: redis.Redis, keys: Keys) -> Iterator[None]:
    yield  # RQ's keys are outside the test's prefix: remove its queued job here
    Queue(keys.rq_queue, connection=redis_client).empty()


def _earlier_run(client: redis.Redis, keys: Keys) -> None:
    """What a stopped system leaves: settings, a model key, queued and pending requests."""
    ControlStore(client, keys).write("old-worker", ControlSettings(batch_size=64, max_seq_len=128))
    client.set(keys.model_info, dump(ModelInfo(name="tinyllama", requested="tinyllama",
                                               synthetic=False, context_length=2048,
                                               tokenizer_json="{}")))  # fmt: skip
    ensure_group(client, keys)
    for i in range(5):
        client.xadd(keys.requests, {"data": f"request {i}"})
    client.xreadgroup(WORKER_GROUP, "gone-worker:1", {keys.requests: ">"}, count=2)
    Queue(keys.rq_queue, connection=client).enqueue("builtins.print", "job")


def test_an_earlier_runs_state_is_found_and_described(
    redis_client: redis.Redis, keys: Keys
) -> None:
    _earlier_run(redis_client, keys)
    found = find_leftovers(redis_client, keys)
    assert found.stale and found.live_workers == []
    assert "batch_size=64" in found.settings["old-worker"]
    assert "max_seq_len=128" in found.settings["old-worker"]
    assert found.model == "tinyllama"
    assert (found.queued, found.pending, found.jobs) == (3, 2, 1)
    text = "\n".join(found.describe())
    assert "'old-worker' (it resumes them)" in text and "3 request(s) queued and 2 pending" in text


def test_a_clean_redis_has_nothing_to_report(redis_client: redis.Redis, keys: Keys) -> None:
    found = find_leftovers(redis_client, keys)
    assert not found.stale and found.describe() == []


def test_live_workers_are_not_stale(redis_client: redis.Redis, keys: Keys) -> None:
    _earlier_run(redis_client, keys)
    redis_client.set(keys.worker_alive("host-cuda0"), "1", ex=30)
    ControlStore(redis_client, keys).write("host-cuda0", ControlSettings())
    found = find_leftovers(redis_client, keys)
    assert found.live_workers == ["host-cuda0"]
    assert "host-cuda0" not in found.settings and "old-worker" in found.settings
    assert found.model is None  # a live worker published it


def test_clearing_removes_the_prefix_and_nothing_else(
    redis_client: redis.Redis, keys: Keys
) -> None:
    _earlier_run(redis_client, keys)
    neighbour = Keys(f"{keys.prefix}-neighbour")
    redis_client.set(neighbour.model_info, "kept")
    try:
        assert clear_state(redis_client, keys) == 3  # control, model, requests
        assert list(redis_client.scan_iter(f"{keys.prefix}:*")) == []
        assert Queue(keys.rq_queue, connection=redis_client).count == 0
        assert not find_leftovers(redis_client, keys).stale
        assert redis_client.get(neighbour.model_info) == b"kept"
    finally:
        redis_client.delete(neighbour.model_info)
