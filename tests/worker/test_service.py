"""The worker loop in-process against a real Redis: settings applied at the batch boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from services.worker.config import WorkerSettings
from services.worker.engine import HFGenerateEngine
from services.worker.service import Worker
from shared.control import ControlStore
from shared.db import RecordWriter, open_records
from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import ControlSettings, GenerationRequest, SamplingParams


@pytest.fixture
def worker(tiny, redis_client: redis.Redis, keys: Keys, aegis_env, tmp_path: Path):
    settings = WorkerSettings(worker_id="w-unit", model="synthetic:tiny", device="cpu",
                              batch_size=4, poll_block_ms=50)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'r.db'}"
    writer = RecordWriter(url, flush_interval_s=0.05)
    tiny.model.float()  # a module-scoped model: start every test at fp32
    tiny.precision = "fp32"
    yield Worker(settings, redis_client, writer, tiny, HFGenerateEngine(tiny)), url
    writer.close()


def _submit(redis_client: redis.Redis, keys: Keys, count: int) -> list[str]:
    queue = WorkerQueue(redis_client, keys, "submitter")
    ids = [f"q{i}" for i in range(count)]
    for request_id in ids:
        queue.submit(
            GenerationRequest(
                id=request_id,
                prompt="x",
                prompt_token_ids=[7, 8, 9],
                params=SamplingParams(max_tokens=3, temperature=0),
            )
        )
    return ids


def test_new_settings_apply_at_the_next_batch(worker, redis_client, keys) -> None:
    loop, url = worker
    control = ControlStore(redis_client, keys)
    _submit(redis_client, keys, 12)
    loop.announce()
    assert loop.step()
    first = control.read("w-unit")
    assert first is not None and first.batch_size == 4
    control.write(
        "w-unit", first.model_copy(update={"batch_size": 8, "precision": "bf16", "reason": "test"})
    )
    assert loop.step()
    loop.writer.flush()
    cycles = open_records(url).fetch("cycles")
    assert [(c["batch_size"], c["settings_version"], c["precision"]) for c in cycles] == [
        (4, 1, "fp32"),
        (8, 2, "bf16"),
    ]
    assert cycles[0]["precision_saved_bytes"] is None
    assert cycles[1]["precision_saved_bytes"] > 0  # fp32 -> bf16 halves the weights
    metric = loop.metrics.registry.get_sample_value
    labels = {"worker": "w-unit"}
    assert metric("aegis_worker_cycles_total", labels) == 2
    assert metric("aegis_worker_batch_size_setting", labels) == 8
    assert metric("aegis_worker_settings_version", labels) == 2
    assert metric("aegis_worker_precision", {**labels, "aegis_worker_precision": "bf16"}) == 1
    assert metric("aegis_worker_requests_total", {**labels, "finish_reason": "length"}) == 12
    assert metric("aegis_worker_tokens_generated_total", labels) == 36


def test_an_unavailable_precision_is_refused_without_stopping(worker, redis_client, keys) -> None:
    loop, url = worker
    control = ControlStore(redis_client, keys)
    control.write("w-unit", ControlSettings(batch_size=2, precision="int8", reason="test"))
    _submit(redis_client, keys, 2)
    try:
        import torchao  # noqa: F401

        expected = "int8"
    except ImportError:
        expected = "fp32"
    assert loop.step()
    loop.writer.flush()
    [cycle] = open_records(url).fetch("cycles")
    assert cycle["precision"] == expected and cycle["batch_size"] == 2


def test_a_redelivered_request_is_answered_once(worker, redis_client, keys) -> None:
    loop, _ = worker
    [request_id] = _submit(redis_client, keys, 1)
    assert loop.step()
    queue = WorkerQueue(redis_client, keys, "checker")
    # The same request queued again (as after a crash between publish and ack).
    queue.submit(GenerationRequest(id=request_id, prompt="x", prompt_token_ids=[7, 8, 9]))
    assert not loop.step()
    assert queue.depth() == 0
    events = redis_client.xlen(keys.result(request_id))
    assert events == 1


def test_an_oom_mid_batch_is_split_recorded_and_loses_nothing(
    tiny, redis_client, keys, aegis_env, tmp_path: Path
) -> None:
    settings = WorkerSettings(worker_id="w-oom", model="synthetic:tiny", device="cpu",
                              batch_size=8, poll_block_ms=50)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'oom.db'}"
    writer = RecordWriter(url, flush_interval_s=0.05)
    tiny.model.float()
    tiny.precision = "fp32"
    # Batches of more than 20 padded tokens "run out of memory": 8 rows of 3 + 3 do.
    engine = HFGenerateEngine(tiny, inject_oom_above_tokens=20)
    loop = Worker(settings, redis_client, writer, tiny, engine)
    ids = _submit(redis_client, keys, 8)
    assert loop.step()
    writer.close()
    queue = WorkerQueue(redis_client, keys, "checker")
    results = [queue.wait_result(request_id, timeout_s=1) for request_id in ids]
    assert all(r is not None and r.error is None and r.completion_tokens == 3 for r in results)
    records = open_records(url)
    [cycle] = records.fetch("cycles")
    ooms = records.fetch("oom_events")
    assert cycle["batch_size"] == 8 and cycle["oom_events"] == len(ooms) >= 1
    assert all(o["recovered"] for o in ooms) and ooms[0]["batch_size"] == 8
    assert loop.metrics.registry.get_sample_value(
        "aegis_worker_oom_events_total", {"worker": "w-oom"}) == len(ooms)  # fmt: skip
    assert [e[1][b"kind"] for e in redis_client.xrange(keys.events_stream)].count(b"oom") == len(
        ooms
    )
