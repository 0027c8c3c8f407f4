"""The worker around the engine core, in-process against a real Redis: settings applied
between steps, publish-once answers, OOM recovery, admission by max_seq_len,
cancellation and dead letters."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from services.worker.__main__ import build_core
from services.worker.config import WorkerSettings
from services.worker.service import Worker
from shared.control import ControlStore
from shared.db import RecordWriter, open_records
from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import ControlSettings, GenerationRequest, GenerationResult, SamplingParams
from tests.cancels import cancel_as_the_gateway

MAX_ITERATIONS = 2000


@pytest.fixture
def make_worker(tiny, redis_client: redis.Redis, aegis_env, tmp_path: Path):
    writers: list[RecordWriter] = []

    def make(worker_id: str = "w-unit", **overrides: object) -> tuple[Worker, str]:
        tiny.model.float()  # a module-scoped model: start every test at fp32
        tiny.precision = "fp32"
        fields = {"worker_id": worker_id, "model": "synthetic:tiny", "device": "cpu",
                  "batch_size": 4, "poll_block_ms": 20, "record_interval_s": 1e-6,
                  "settings_poll_s": 0, "kv_budget_bytes": 1 << 20, **overrides}  # fmt: skip
        settings = WorkerSettings(**fields)  # type: ignore[arg-type]
        url = f"sqlite:///{tmp_path / f'{worker_id}.db'}"
        writer = RecordWriter(url, flush_interval_s=0.05)
        writers.append(writer)
        return Worker(settings, redis_client, writer, tiny, build_core(tiny, settings)), url

    yield make
    for writer in writers:
        writer.close()


def _submit(redis_client: redis.Redis, keys: Keys, count: int, **params: object) -> list[str]:
    queue = WorkerQueue(redis_client, keys, "submitter")
    ids = [f"q{i}" for i in range(count)]
    params = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, **params}
    for request_id in ids:
        queue.submit(
            GenerationRequest(
                id=request_id, prompt="x", prompt_token_ids=[1, 7, 8, 9],
                params=SamplingParams(**params),  # type: ignore[arg-type]
            )
        )  # fmt: skip
    return ids


def _fail_first(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, times: int
) -> list[int]:
    """Make ``target.name`` raise a Redis connection error on its first ``times`` calls;
    the list returned holds the number of each call that failed."""
    real, calls, failed = getattr(target, name), iter(range(1, 1_000_000)), []

    def flaky(*args: object) -> object:
        call = next(calls)
        if call <= times:
            failed.append(call)
            raise redis.ConnectionError("Connection refused")
        return real(*args)

    monkeypatch.setattr(target, name, flaky)
    return failed


def run_until(worker: Worker, done: Callable[[], bool]) -> None:
    for _ in range(MAX_ITERATIONS):
        if done():
            return
        worker.loop.iterate()
    raise AssertionError("condition not reached")


def answered(redis_client: redis.Redis, keys: Keys, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(redis_client.exists(keys.done(i)) for i in ids)


def test_requests_join_a_running_batch_and_are_answered_once(make_worker, redis_client, keys):
    worker, url = make_worker()
    worker.announce()
    first = _submit(redis_client, keys, 3, max_tokens=20)
    worker.loop.iterate()
    assert worker.core.stats().running == 3
    queue = WorkerQueue(redis_client, keys, "later")
    late = SamplingParams(max_tokens=2, ignore_eos=True)
    queue.submit(GenerationRequest(id="late", prompt="x", prompt_token_ids=[1, 5], params=late))
    run_until(worker, answered(redis_client, keys, ["late"]))
    assert not all(redis_client.exists(keys.done(i)) for i in first)  # it overtook them
    run_until(worker, answered(redis_client, keys, first))
    results = [queue.wait_result(i, timeout_s=1) for i in [*first, "late"]]
    assert [r.completion_tokens for r in results if r] == [20, 20, 20, 2]
    assert queue.depth() == 0 and redis_client.xpending(keys.requests, "workers")["pending"] == 0
    worker.writer.flush()
    records = open_records(url)
    assert len(records.fetch("requests")) == 4
    cycles = records.fetch("cycles")
    assert sum(c["tokens_generated"] for c in cycles) == 62
    assert max(c["batch_size"] for c in cycles) >= 3 and cycles[-1]["kv_blocks_used"] == 0


def test_new_settings_apply_between_steps(make_worker, redis_client, keys) -> None:
    worker, url = make_worker()
    control = ControlStore(redis_client, keys)
    ids = _submit(redis_client, keys, 6, max_tokens=30)
    worker.loop.iterate()
    first = control.read("w-unit")
    assert first is not None and first.batch_size == 4 and worker.core.stats().running == 4
    control.write("w-unit", first.model_copy(
        update={"batch_size": 6, "precision": "bf16", "max_batched_tokens": 64, "reason": "test"}
    ))  # fmt: skip
    worker.loop.iterate()
    assert worker.core.precision == "bf16" and worker.core.limits.max_num_seqs == 6
    assert worker.core.limits.max_batched_tokens == 64
    run_until(worker, answered(redis_client, keys, ids))
    worker.writer.flush()
    cycles = open_records(url).fetch("cycles")
    assert {c["settings_version"] for c in cycles} == {1, 2}
    assert cycles[-1]["precision"] == "bf16" and cycles[-1]["max_batched_tokens"] == 64
    assert any((c["precision_saved_bytes"] or 0) > 0 for c in cycles)  # fp32 -> bf16
    metric = worker.metrics.registry.get_sample_value
    labels = {"worker": "w-unit"}
    assert metric("aegis_worker_settings_version", labels) == 2
    assert metric("aegis_worker_precision", {**labels, "aegis_worker_precision": "bf16"}) == 1
    assert metric("aegis_worker_requests_total", {**labels, "finish_reason": "length"}) == 6
    assert metric("aegis_worker_generation_tokens_total", labels) == 180


def test_the_agents_max_seq_len_is_an_admission_limit(make_worker, redis_client, keys) -> None:
    worker, _ = make_worker()
    control = ControlStore(redis_client, keys)
    control.write("w-unit", ControlSettings(batch_size=4, max_seq_len=16, precision="fp32"))
    [rid] = _submit(redis_client, keys, 1, max_tokens=20)  # 4 + 20 > 16: must wait
    for _ in range(30):
        worker.loop.iterate()
    assert not redis_client.exists(keys.done(rid)) and worker.core.stats().waiting == 1
    control.write("w-unit", ControlSettings(batch_size=4, max_seq_len=64, precision="fp32"))
    run_until(worker, answered(redis_client, keys, [rid]))
    result = WorkerQueue(redis_client, keys, "c").wait_result(rid, timeout_s=1)
    assert result is not None and result.completion_tokens == 20 and result.prompt_tokens == 4
    assert result.note is None


def test_an_unavailable_precision_is_refused_without_stopping(make_worker, redis_client, keys):
    worker, _ = make_worker()
    ControlStore(redis_client, keys).write(
        "w-unit", ControlSettings(batch_size=2, max_seq_len=512, precision="int8")
    )
    ids = _submit(redis_client, keys, 2)
    try:
        import torchao  # noqa: F401

        expected = "int8"
    except ImportError:
        expected = "fp32"
    run_until(worker, answered(redis_client, keys, ids))
    assert worker.core.precision == expected and worker.core.limits.max_num_seqs == 2


def test_a_redelivered_request_is_answered_once(make_worker, redis_client, keys) -> None:
    worker, _ = make_worker()
    [request_id] = _submit(redis_client, keys, 1)
    run_until(worker, answered(redis_client, keys, [request_id]))
    queue = WorkerQueue(redis_client, keys, "checker")
    # The same request queued again (as after a crash between publish and ack).
    queue.submit(GenerationRequest(id=request_id, prompt="x", prompt_token_ids=[7, 8, 9]))
    for _ in range(5):
        worker.loop.iterate()
    assert queue.depth() == 0 and not worker.core.has_work
    assert redis_client.xlen(keys.result(request_id)) == 1


def test_a_run_that_loses_the_race_to_answer_is_dropped_and_logged(
    make_worker, redis_client, keys, caplog: pytest.LogCaptureFixture
) -> None:
    worker, url = make_worker()
    [request_id] = _submit(redis_client, keys, 1, max_tokens=20)
    worker.loop.iterate()
    assert worker.core.stats().running == 1
    # Another worker answers it meanwhile (it reclaimed the entry while this one ran it).
    queue = WorkerQueue(redis_client, keys, "other")
    other = GenerationResult(
        request_id=request_id, text="theirs", finish_reason="length", prompt_tokens=4,
        completion_tokens=20, model="m", worker_id="w-other", queued_at=0.0, started_at=0.0,
    )  # fmt: skip
    assert queue.publish_result(other)
    run_until(worker, lambda: not worker.core.has_work)
    assert redis_client.xlen(keys.result(request_id)) == 1
    answer = queue.wait_result(request_id, timeout_s=1)
    assert answer is not None and answer.worker_id == "w-other"
    assert f"request {request_id} was answered already by another delivery" in caplog.text
    assert redis_client.xpending(keys.requests, "workers")["pending"] == 0  # acked all the same
    worker.writer.flush()
    assert open_records(url).fetch("requests") == []  # recorded by the worker that answered


def test_an_oom_mid_step_is_recovered_recorded_and_loses_nothing(make_worker, redis_client, keys):
    worker, url = make_worker("w-oom", batch_size=8, inject_oom_above_tokens=20)
    ids = _submit(redis_client, keys, 8)  # 8 prompts of 4 tokens: the first step has 32
    run_until(worker, answered(redis_client, keys, ids))
    queue = WorkerQueue(redis_client, keys, "checker")
    results = [queue.wait_result(request_id, timeout_s=1) for request_id in ids]
    assert all(r is not None and r.error is None and r.completion_tokens == 3 for r in results)
    worker.writer.flush()
    records = open_records(url)
    ooms = records.fetch("oom_events")
    assert len(ooms) >= 1 and all(o["recovered"] for o in ooms)
    assert sum(c["oom_events"] for c in records.fetch("cycles")) == len(ooms)
    assert worker.metrics.registry.get_sample_value(
        "aegis_worker_oom_events_total", {"worker": "w-oom"}) == len(ooms)  # fmt: skip
    kinds = [e[1][b"kind"] for e in redis_client.xrange(keys.events_stream)]
    assert kinds.count(b"oom") == len(ooms)


def test_a_cancelled_request_is_aborted_and_recorded(
    make_worker, redis_client, keys, redis_url
) -> None:
    worker, url = make_worker()
    ids = _submit(redis_client, keys, 2, max_tokens=200)
    worker.loop.iterate()
    cancel_as_the_gateway(redis_url, keys, ["q0"])
    run_until(worker, answered(redis_client, keys, ["q0"]))
    assert worker.core.stats().running == 1
    result = WorkerQueue(redis_client, keys, "c").wait_result("q0", timeout_s=1)
    assert result is not None and result.finish_reason == "cancelled"
    assert result.completion_tokens < 200
    run_until(worker, answered(redis_client, keys, ids))
    worker.writer.flush()
    reasons = {r["request_id"]: r["finish_reason"] for r in open_records(url).fetch("requests")}
    assert reasons == {"q0": "cancelled", "q1": "length"}


def test_a_request_delivered_too_often_is_dead_lettered(make_worker, redis_client, keys) -> None:
    worker, _ = make_worker("w-dead", max_deliveries=1)
    [rid] = _submit(redis_client, keys, 1)
    # A worker that pulls and dies without acking: the entry is delivered once already.
    dead = WorkerQueue(redis_client, keys, "dead-consumer", visibility_timeout_s=0.001)
    assert [d.request.id for d in dead.pull(1, block_ms=10)] == [rid]
    run_until(worker, answered(redis_client, keys, [rid]))
    result = WorkerQueue(redis_client, keys, "c").wait_result(rid, timeout_s=1)
    assert result is not None and result.finish_reason == "error" and "died" in str(result.error)
    assert redis_client.xlen(keys.dead_letters) == 1
    assert not worker.core.has_work


def test_stop_hands_back_what_never_ran_and_finishes_the_rest(make_worker, redis_client, keys):
    worker, _ = make_worker(batch_size=2, drain_timeout_s=30)
    ids = _submit(redis_client, keys, 5, max_tokens=10)
    worker.loop.iterate()  # two running, two waiting in the core, one left in the stream
    assert worker.core.stats().running == 2 and worker.core.stats().waiting == 2
    worker.stop()
    worker.run()  # returns after draining
    assert sum(bool(redis_client.exists(keys.done(i))) for i in ids) == 2
    pending = redis_client.xpending(keys.requests, "workers")["pending"]
    assert pending == 2  # handed back: immediately reclaimable by another worker
    other, _ = make_worker("w-other", visibility_timeout_s=0.001)
    run_until(other, answered(redis_client, keys, ids))


def test_a_redis_error_is_retried_without_losing_the_running_requests(
    make_worker, redis_client, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _ = make_worker()
    ids = _submit(redis_client, keys, 2, max_tokens=12)
    worker.loop.iterate()
    _fail_first(monkeypatch, worker.queue, "cancelled", times=2)
    worker._iterate()
    worker._iterate()
    assert worker.core.stats().running == 2  # still held by the core, nothing lost
    for _ in range(MAX_ITERATIONS):
        if answered(redis_client, keys, ids)():
            break
        worker._iterate()
    results = [WorkerQueue(redis_client, keys, "c").wait_result(i, timeout_s=1) for i in ids]
    assert all(r is not None and r.completion_tokens == 12 for r in results)


def test_answers_a_redis_error_held_back_are_published_once_redis_answers(
    make_worker, redis_client, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core lets go of a request when it finishes; if publishing its answer then
    fails, the worker keeps the step's output and publishes it first thing next time,
    even with nothing left to run. Before, the answers were dropped and the requests
    ran again once their entries' claims lapsed (the visibility timeout, 30 s)."""
    worker, url = make_worker()
    ids = _submit(redis_client, keys, 2, max_tokens=3)
    runs: list[str] = []
    add = worker.core.add
    monkeypatch.setattr(worker.core, "add", lambda r: (runs.append(r.id), add(r))[1])
    failures = _fail_first(monkeypatch, worker.queue, "publish_results", times=1)
    for _ in range(MAX_ITERATIONS):
        if answered(redis_client, keys, ids)() and not worker.held:
            break
        worker._iterate()
    else:
        raise AssertionError("the answers were never published")
    assert failures == [1]  # the failure did happen
    assert sorted(runs) == ids  # each ran once: published late, not computed again
    assert [redis_client.xlen(keys.result(i)) for i in ids] == [1, 1]
    assert redis_client.xpending(keys.requests, "workers")["pending"] == 0
    worker.writer.flush()
    assert sorted(r["request_id"] for r in open_records(url).fetch("requests")) == ids


def test_each_cycle_logs_how_busy_the_engine_was(
    make_worker, redis_client, keys, caplog: pytest.LogCaptureFixture
) -> None:
    worker, _ = make_worker()
    ids = _submit(redis_client, keys, 2, max_tokens=4)
    with caplog.at_level(logging.INFO, logger="services.worker.service"):
        run_until(worker, answered(redis_client, keys, ids))
        worker.loop.flush()
    shares = [int(m) for m in re.findall(r"engine busy (\d+)%", caplog.text)]
    assert shares and all(0 < share <= 100 for share in shares), caplog.text


def test_settings_kept_from_before_a_restart_apply_before_serving(
    make_worker, redis_client, keys
) -> None:
    """An agent's settings in Redis (kept across a worker's restart) are applied, and
    their graphs captured, before the worker announces itself: not in its first step."""
    ControlStore(redis_client, keys).write(
        "w-unit",
        ControlSettings(batch_size=3, max_seq_len=64, precision="fp32", kv_budget_bytes=1 << 19),
    )
    worker, _ = make_worker()
    assert worker.core.limits.max_num_seqs == 4  # the worker's own start-up setting
    worker.stop()  # run() then prepares and announces, and serves nothing
    worker.run()
    assert worker.core.limits.max_num_seqs == 3 and worker.core.limits.max_seq_len == 64
    assert worker.core.stats().kv_bytes <= 1 << 19
    assert worker.loop.applied.batch_size == 3 and worker.core.steps == 0
