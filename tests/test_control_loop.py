"""The adaptive loop through real processes on CPU: monitor + agent + worker over Redis.

The agent's new settings must reach the worker within one batch, and the decision
with its reason must be in the records.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis

from shared.control import ControlStore
from shared.db import open_records
from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import GenerationRequest, SamplingParams
from tests.processes import Service, python_module, wait_for

pytestmark = pytest.mark.slow


def _submit(queue: WorkerQueue, count: int) -> list[str]:
    ids = []
    for i in range(count):
        request_id = uuid.uuid4().hex
        queue.submit(
            GenerationRequest(
                id=request_id,
                prompt="x",
                prompt_token_ids=[5 + i % 50] * 12,
                params=SamplingParams(max_tokens=4, temperature=0),
            )
        )
        ids.append(request_id)
    return ids


def test_agent_settings_reach_the_worker_within_one_batch(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'records.db'}"
    env = {
        **aegis_env,
        "AEGIS_DATABASE_URL": database,
        "OMP_NUM_THREADS": "1",
        "AEGIS_GROW_COOLDOWN_S": "0",
        "AEGIS_GROW_COOLDOWN_CYCLES": "1",
        "AEGIS_INTERVAL_S": "0.2",
    }
    worker_env = {
        **env,
        "AEGIS_WORKER_ID": "w-loop",
        "AEGIS_MODEL": "synthetic:tiny",
        "AEGIS_DEVICE": "cpu",
        "AEGIS_BATCH_SIZE": "2",
    }
    services = [
        Service("monitor", python_module("services.monitor"), env, tmp_path),
        Service("agent", python_module("services.agent"), env, tmp_path),
        Service("worker", python_module("services.worker"), worker_env, tmp_path),
    ]
    keys = Keys(env["AEGIS_KEY_PREFIX"])
    client = redis.Redis.from_url(env["AEGIS_REDIS_URL"])
    control = ControlStore(client, keys)
    queue = WorkerQueue(client, keys, "test-submitter")
    try:
        wait_for(lambda: control.read("w-loop") is not None, 120, "worker settings", services[2])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ids = _submit(queue, 24)
            for request_id in ids:
                assert queue.wait_result(request_id, timeout_s=60) is not None
            settings = control.read("w-loop")
            if settings is not None and settings.version >= 2 and settings.batch_size > 2:
                break
        _submit_and_wait(queue, 16)
    finally:
        for service in reversed(services):
            assert service.stop() == 0, service.log()
    records = open_records(database)
    decisions = [d for d in records.fetch("decisions") if d["worker_id"] == "w-loop"]
    assert decisions, "the agent recorded no decision"
    first = decisions[0]
    assert first["reason"] and first["batch_size_after"] != first["batch_size_before"]
    cycles = records.fetch("cycles", worker_id="w-loop")
    # Each cycle that started after a decision was written ran with that version or later.
    for decision in decisions:
        later = [c for c in cycles if c["ts"] - c["latency_s"] > decision["ts"] + 0.05]
        assert all(c["settings_version"] >= decision["version_after"] for c in later)
    assert any(c["settings_version"] == first["version_after"] for c in cycles)
    assert max(c["batch_size"] for c in cycles) > 2


def _submit_and_wait(queue: WorkerQueue, count: int) -> None:
    for request_id in _submit(queue, count):
        assert queue.wait_result(request_id, timeout_s=60) is not None
