"""The stream queue against a real Redis: batching, acks, reclaim, answer-once."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.queue import GatewayQueue, QueueFull, WorkerQueue
from shared.schemas import GenerationRequest, GenerationResult, TokenDelta


def _request(i: int) -> GenerationRequest:
    return GenerationRequest(id=f"r{i}", prompt=f"p{i}", prompt_token_ids=[1, 2, i])


def _result(request_id: str, text: str = "out") -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        text=text,
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        model="m",
        worker_id="w",
        queued_at=0.0,
        started_at=0.0,
    )


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
