"""The stream queue against a real Redis: batching, acks, reclaim, answer-once."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

import shared.queue as queue_module
from shared.keys import Keys
from shared.queue import RESULT_MAXLEN, RESULT_READ_TTL_S, GatewayQueue, QueueFull, WorkerQueue
from shared.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    IdempotencyRecord,
    SamplingParams,
    TokenDelta,
)
from tests.answers import result as _result
from tests.cancels import cancel_as_the_gateway


def _request(i: int) -> GenerationRequest:
    return GenerationRequest(id=f"r{i}", prompt=f"p{i}", prompt_token_ids=[1, 2, i])


def test_pull_takes_up_to_count_and_ack_empties_the_backlog(
    redis_client: redis.Redis, keys: Keys
) -> None:
    queue = WorkerQueue(redis_client, keys, "w1")
    for i in range(5):
        queue.submit(_request(i))
    first = queue.pull(3, block_ms=10)
    assert [d.request.id for d in first] == ["r0", "r1", "r2"]
    assert queue.depth() == 5
    queue.ack([d.entry_id for d in first])
    assert queue.depth() == 2
    assert [d.request.id for d in queue.pull(10, block_ms=10)] == ["r3", "r4"]


def test_entries_of_a_dead_worker_are_reclaimed_after_the_visibility_timeout(
    redis_client: redis.Redis, keys: Keys
) -> None:
    dead = WorkerQueue(redis_client, keys, "dead", visibility_timeout_s=0.2)
    alive = WorkerQueue(redis_client, keys, "alive", visibility_timeout_s=0.2)
    dead.submit(_request(1))
    assert len(dead.pull(1, block_ms=10)) == 1
    assert alive.pull(1, block_ms=10) == []  # still claimed, not yet timed out
    time.sleep(0.3)
    taken = alive.pull(1, block_ms=10)
    assert [d.request.id for d in taken] == ["r1"]
    assert taken[0].deliveries == 2


def test_refreshing_a_claim_keeps_a_long_batch_from_being_reclaimed(
    redis_client: redis.Redis, keys: Keys
) -> None:
    busy = WorkerQueue(redis_client, keys, "busy", visibility_timeout_s=0.3)
    other = WorkerQueue(redis_client, keys, "other", visibility_timeout_s=0.3)
    busy.submit(_request(1))
    held = busy.pull(1, block_ms=10)
    for _ in range(3):
        time.sleep(0.15)
        busy.refresh_claims([d.entry_id for d in held])
        assert other.reclaim(1) == []


def test_a_result_is_published_once(redis_client: redis.Redis, keys: Keys) -> None:
    queue = WorkerQueue(redis_client, keys, "w")
    assert queue.publish_result(_result("x", "first"))
    assert not queue.publish_result(_result("x", "second"))
    assert queue.answered(["x", "never-answered"]) == {"x"}
    assert queue.publish_results([_result("x", "third"), _result("y")]) == [False, True]
    got = queue.wait_result("x", timeout_s=1)
    assert got is not None and got.text == "first"


def test_gateway_admission_and_event_stream(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    worker = WorkerQueue(redis_client, keys, "w")

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        gateway = GatewayQueue(client, keys, max_depth=1)
        await gateway.submit(_request(1))
        try:
            await gateway.submit(_request(2))
            raise AssertionError("second submit should be refused")
        except QueueFull as exc:
            assert exc.depth == 1
        # A redelivery resends "Hel" after "Hello" was streamed: only new text passes.
        worker.publish_deltas(
            [
                TokenDelta(request_id="r1", offset=0, text="Hel"),
                TokenDelta(request_id="r1", offset=3, text="lo"),
                TokenDelta(request_id="r1", offset=0, text="Hel"),
                TokenDelta(request_id="r1", offset=3, text="lo!"),
            ]
        )
        worker.publish_result(_result("r1", "Hello!"))
        seen = [e.text async for e in gateway.events("r1", timeout_s=2)]
        await client.aclose()
        return seen

    assert asyncio.run(scenario()) == ["Hel", "lo", "!", "Hello!"]


def test_released_entries_are_reclaimable_at_once(redis_client: redis.Redis, keys: Keys) -> None:
    leaving = WorkerQueue(redis_client, keys, "leaving", visibility_timeout_s=60)
    staying = WorkerQueue(redis_client, keys, "staying", visibility_timeout_s=60)
    leaving.submit(_request(7))
    held = leaving.pull(1, block_ms=10)
    leaving.release([d.entry_id for d in held])
    assert [d.request.id for d in staying.pull(1, block_ms=10)] == ["r7"]


def _gateway_queue(
    redis_url: str, keys: Keys, max_depth: int
) -> tuple[aioredis.Redis, GatewayQueue]:
    client = aioredis.Redis.from_url(redis_url)
    return client, GatewayQueue(client, keys, max_depth=max_depth)


def test_admission_queues_a_whole_body_or_nothing(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    worker = WorkerQueue(redis_client, keys, "w")

    async def scenario() -> None:
        client, gateway = _gateway_queue(redis_url, keys, max_depth=10)
        await gateway.admit([_request(i) for i in range(8)])
        # Two held by a worker still count: 8 in all, so a body of 3 does not fit.
        held = worker.pull(2, block_ms=10)
        assert len(held) == 2
        try:
            await gateway.admit([_request(i) for i in range(10, 13)])
            raise AssertionError("a body over the bound must be refused whole")
        except QueueFull as exc:
            assert exc.depth == 8
        assert worker.depth() == 8  # nothing of the refused body was queued
        admitted = await gateway.admit([_request(20), _request(21)])
        assert admitted.depth == 8 and admitted.record is None
        # Counted from the group (lag + pending), not XLEN: an entry acked but not
        # deleted no longer counts.
        redis_client.xack(keys.requests, "workers", held[0].entry_id)
        assert (await gateway.admit([_request(30)])).depth == 9
        await client.aclose()

    asyncio.run(scenario())


def test_an_idempotency_key_queues_its_body_once(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    record = IdempotencyRecord(
        body_digest="d", response_id="cmpl-1", created=1, model_name="m", synthetic=True,
        prompt_tokens=3, request_ids=["r1"],
    )  # fmt: skip

    async def scenario() -> None:
        client, gateway = _gateway_queue(redis_url, keys, max_depth=10)
        first = await gateway.admit([_request(1)], "key-a", record, record_ttl_s=60)
        again = await gateway.admit([_request(1)], "key-a", record, record_ttl_s=60)
        assert first.record is None
        assert again.record == record
        await gateway.save_results("key-a", record, [_result("r1", "answer")])
        stored = await gateway.admit([_request(1)], "key-a", record)
        assert stored.record is not None and stored.record.results is not None
        assert stored.record.results[0].text == "answer"
        await client.aclose()

    asyncio.run(scenario())
    assert WorkerQueue(redis_client, keys, "w").depth() == 1
    assert 0 < redis_client.ttl(keys.idempotency("key-a")) <= 60


def test_cancel_keys_are_seen_by_the_worker_in_one_call(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    worker = WorkerQueue(redis_client, keys, "w")
    assert worker.cancelled([]) == set()
    cancel_as_the_gateway(redis_url, keys, ["a", "c"], ttl_s=30)
    assert worker.cancelled(["a", "b", "c"]) == {"a", "c"}
    assert 0 < redis_client.ttl(keys.cancel("a")) <= 30


def test_a_cancel_of_a_request_already_checked_is_seen_at_the_next_step(
    redis_client: redis.Redis, keys: Keys, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker reads only new ids' keys while the cancels counter stands still; the
    gateway's counter makes it read them all again."""
    monkeypatch.setattr(queue_module, "CANCEL_RECHECK_S", 3600.0)  # the counter alone
    worker = WorkerQueue(redis_client, keys, "w")
    assert worker.cancelled(["a", "b"]) == set()
    assert worker.cancelled(["a", "b"]) == set()
    cancel_as_the_gateway(redis_url, keys, ["b"])
    assert worker.cancelled(["a", "b", "c"]) == {"b"}
    # A key set behind the counter's back is not read again for a checked id...
    redis_client.set(keys.cancel("a"), "1")
    assert worker.cancelled(["a", "b"]) == {"b"}
    # ...but a new id's key is, whatever the counter says.
    redis_client.set(keys.cancel("d"), "1")
    assert worker.cancelled(["a", "d"]) == {"d"}
    # And every key is read again once CANCEL_RECHECK_S has passed.
    monkeypatch.setattr(queue_module, "CANCEL_RECHECK_S", 0.0)
    assert worker.cancelled(["a", "d"]) == {"a", "d"}


def test_a_dead_letter_answers_once_records_and_acks(redis_client: redis.Redis, keys: Keys) -> None:
    queue = WorkerQueue(redis_client, keys, "w")
    poison = GenerationRequest(
        id="bad", prompt="p" * 500, prompt_token_ids=[1, 2], params=SamplingParams(seed=7)
    )
    queue.submit(poison)
    delivery = queue.pull(1, block_ms=10)[0]
    delivery.deliveries = 5
    assert queue.dead_letter(delivery, "Overflow when unpacking long long", "m", "w")
    answer = queue.wait_result("bad", timeout_s=1)
    assert answer is not None and answer.finish_reason == "error"
    assert "failed 5 deliveries" in (answer.error or "")
    assert "Overflow" in (answer.error or "")
    assert queue.depth() == 0  # acked and deleted
    assert redis_client.xpending(keys.requests, "workers")["pending"] == 0
    entries = redis_client.xrange(keys.dead_letters)
    letter = DeadLetter.model_validate_json(entries[0][1][b"data"])
    assert (letter.request_id, letter.deliveries, letter.params.seed) == ("bad", 5, 7)
    assert len(letter.prompt_preview) == 200
    assert int(redis_client.get(keys.dead_letter_count) or 0) == 1
    # A second delivery of the same poison request answers nobody twice.
    assert not queue.dead_letter(delivery, "again", "m", "w")
    assert redis_client.xlen(keys.dead_letters) == 1


def test_result_streams_are_capped_and_expire_soon_after_reading(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    queue = WorkerQueue(redis_client, keys, "w")
    for start in range(0, RESULT_MAXLEN * 3, 500):
        queue.publish_deltas(
            [TokenDelta(request_id="long", offset=i, text="x") for i in range(start, start + 500)]
        )
    assert redis_client.xlen(keys.result("long")) < RESULT_MAXLEN * 1.5
    queue.publish_result(_result("long", "x" * RESULT_MAXLEN * 3))

    async def scenario() -> str:
        client, gateway = _gateway_queue(redis_url, keys, max_depth=10)
        events = [event async for event in gateway.events("long", timeout_s=2)]
        await gateway.finish_reading(["long"])
        await client.aclose()
        final = events[-1]
        assert isinstance(final, GenerationResult)
        return final.text

    assert len(asyncio.run(scenario())) == RESULT_MAXLEN * 3
    assert 0 < redis_client.ttl(keys.result("long")) <= RESULT_READ_TTL_S


def test_reclaimed_entries_carry_their_own_delivery_counts(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Entries of a dead worker far apart in the stream, with many entries another worker
    holds between them: each reclaimed entry still gets its own delivery count."""
    dead = WorkerQueue(redis_client, keys, "dead", visibility_timeout_s=0.2)
    alive = WorkerQueue(redis_client, keys, "alive", visibility_timeout_s=0.2)
    for i in range(12):
        dead.submit(_request(i))
    first = dead.pull(1, block_ms=10)
    held = alive.pull(10, block_ms=10)  # held, and kept fresh below: never reclaimed
    last = dead.pull(1, block_ms=10)
    time.sleep(0.3)
    alive.refresh_claims([d.entry_id for d in held])
    taken = alive.reclaim(2)
    assert [d.request.id for d in taken] == [first[0].request.id, last[0].request.id]
    assert [d.deliveries for d in taken] == [2, 2]


def test_read_marks_are_written_in_the_background_in_one_batch(
    redis_client: redis.Redis, keys: Keys, redis_url: str
) -> None:
    queue = WorkerQueue(redis_client, keys, "w")
    ids = [f"read-{i}" for i in range(5)]
    queue.publish_results([_result(rid, "x") for rid in ids])

    async def scenario() -> None:
        client, gateway = _gateway_queue(redis_url, keys, max_depth=10)
        gateway.mark_read(ids[:2])
        gateway.mark_read(ids[2:])  # same moment: joins the first batch
        gateway.mark_read([])
        await gateway.settle()
        assert gateway._marking is None and gateway._read == []
        await client.aclose()

    asyncio.run(scenario())
    for rid in ids:
        assert 0 < redis_client.ttl(keys.result(rid)) <= RESULT_READ_TTL_S
