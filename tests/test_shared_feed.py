"""The gateway's result feed: many waiting requests read through a few blocking reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import pytest
import redis
import redis.asyncio as aioredis

import shared.feed as feed_module
from shared.feed import ResultFeed, entry_order, stream_entries
from shared.keys import Keys
from shared.queue import GatewayQueue, WorkerQueue
from shared.schemas import TokenDelta
from tests.answers import result as _result

# Long enough that a test relying on a read ending by itself would time out instead.
NEVER_MS = 120_000


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that end only when an entry arrives (or a wake): a missed wake hangs."""
    monkeypatch.setattr(feed_module, "BLOCK_MS", NEVER_MS)


async def _first(batches: AsyncGenerator[list[feed_module.Entry]]) -> list[str]:
    batch = await anext(batches)
    await batches.aclose()
    return [entry_id for entry_id, _ in batch]


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (a generous bound: a loaded CI machine is slow, not stuck)."""
    try:
        async with asyncio.timeout(60):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def test_entry_ids_order_as_redis_orders_them() -> None:
    assert entry_order("10-2") < entry_order("10-10") < entry_order("11-0")
    assert entry_order("7") == (7, 0)


def test_replies_of_both_protocols_give_the_same_streams() -> None:
    entry = (b"1-0", {b"kind": b"result"})
    resp2 = [[b"k1", [entry]], [b"k2", [entry, (b"2-0", {})]]]
    resp3 = {b"k1": [[entry]], b"k2": [[entry, (b"2-0", {})]]}
    assert stream_entries(resp2) == stream_entries(resp3)
    assert [(k, [i for i, _ in e]) for k, e in stream_entries(resp2)] == [
        ("k1", ["1-0"]), ("k2", ["1-0", "2-0"]),
    ]  # fmt: skip
    assert stream_entries(None) == []


def test_requests_that_start_waiting_during_a_read_are_woken_into_it(
    redis_client: redis.Redis, keys: Keys, redis_url: str, slow_reads: None
) -> None:
    """The reader blocks over the first request's stream; requests that start waiting
    afterwards get their answers at once, not when that read ends (two minutes)."""
    publisher = WorkerQueue(redis_client, keys, "w")

    async def scenario() -> None:
        # No socket timeout: only an entry or a wake can end the blocked read.
        client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
        feed = ResultFeed(client, keys)
        first = asyncio.create_task(_first(feed.entries(keys.result("a"), 60)))
        await _until(lambda: feed.waiting == 1, "the first request waits")
        await asyncio.sleep(0.05)  # its read is in Redis, blocked
        later = [asyncio.create_task(_first(feed.entries(keys.result(r), 60))) for r in "bcd"]
        await _until(lambda: feed.waiting == 4, "the later requests wait")
        publisher.publish_results([_result(r) for r in "bcd"])
        assert all(len(ids) == 1 for ids in await asyncio.gather(*later))
        publisher.publish_result(_result("a"))
        assert len(await first) == 1
        assert feed.waiting == 0
        # A gateway that dies leaves its wake stream to expire.
        [wake_key] = [k.decode() for k in redis_client.scan_iter(f"{keys.prefix}:result-wake:*")]
        assert 0 < redis_client.ttl(wake_key) <= feed_module.WAKE_TTL_S
        await feed.close()
        await client.aclose()

    asyncio.run(scenario())
    assert not list(redis_client.scan_iter(f"{keys.prefix}:result-wake:*"))


def test_waiters_are_spread_over_readers_and_each_gets_its_own_entries(
    redis_client: redis.Redis, keys: Keys, redis_url: str, slow_reads: None
) -> None:
    publisher = WorkerQueue(redis_client, keys, "w")
    ids = [f"r{i}" for i in range(7)]

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        feed = ResultFeed(client, keys, per_reader=3)
        gateway = GatewayQueue(client, keys, max_depth=10)
        gateway.feed = feed
        waits = [asyncio.create_task(_events(gateway, r)) for r in ids]
        await _until(lambda: feed.waiting == len(ids), "every request waits")
        assert len(feed._readers) == 3
        for r in ids:
            publisher.publish_deltas([TokenDelta(request_id=r, offset=0, text=f"{r}:")])
        publisher.publish_results([_result(r, f"{r}:done") for r in ids])
        got = await asyncio.gather(*waits)
        assert got == [[f"{r}:", f"{r}:done"] for r in ids]
        await gateway.settle()
        await client.aclose()

    asyncio.run(scenario())


async def _events(gateway: GatewayQueue, request_id: str, timeout_s: float = 60) -> list[str]:
    return [event.text async for event in gateway.events(request_id, timeout_s)]


def test_a_request_past_its_deadline_times_out_and_leaves_the_reads(
    keys: Keys, redis_url: str
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        gateway = GatewayQueue(client, keys, max_depth=10)
        with pytest.raises(TimeoutError, match="no answer to request late"):
            await _events(gateway, "late", timeout_s=0.2)
        assert gateway.feed.waiting == 0
        await gateway.settle()
        await client.aclose()

    asyncio.run(scenario())


def test_the_reader_outlives_redis_errors_and_keeps_its_place(
    redis_client: redis.Redis, keys: Keys, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails (Redis restarting) is retried from where the request was: the
    entries published meanwhile all arrive, none twice."""
    monkeypatch.setattr(feed_module, "RETRY_S", 0.01)
    publisher = WorkerQueue(redis_client, keys, "w")
    failures = 2

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        real_xread = client.xread

        async def flaky_xread(*args: object, **kwargs: object) -> object:
            nonlocal failures
            if failures:
                failures -= 1
                publisher.publish_deltas(
                    [TokenDelta(request_id="f", offset=1 - failures, text="ab"[1 - failures])]
                )
                raise redis.ConnectionError("Redis is loading")
            return await real_xread(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(client, "xread", flaky_xread)
        gateway = GatewayQueue(client, keys, max_depth=10)
        waiting = asyncio.create_task(_events(gateway, "f"))
        await _until(lambda: failures == 0, "both reads failed")
        publisher.publish_result(_result("f", "ab"))
        got = await waiting
        await gateway.settle()
        await client.aclose()
        return got

    assert asyncio.run(scenario()) == ["a", "b", "ab"]


@pytest.mark.parametrize("wakes_reach_redis", [True, False])
def test_two_readers_of_one_stream_each_get_every_entry(
    redis_client: redis.Redis,
    keys: Keys,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    wakes_reach_redis: bool,
) -> None:
    """A retry with the same Idempotency-Key reads its first run's stream while that
    run's own request still waits on it. The read in flight started past the entries
    the second reader lacks: what it returns is not handed to that reader, which gets
    the stream from its start in the next read (woken into it, or, when no wake reaches
    Redis, after the read ends by an entry)."""
    publisher = WorkerQueue(redis_client, keys, "w")
    publisher.publish_deltas([TokenDelta(request_id="y", offset=0, text="He")])
    monkeypatch.setattr(feed_module, "CLOSE_S", 0.1)  # a close may not wake it either

    async def scenario() -> list[list[str]]:
        client = aioredis.Redis.from_url(redis_url)
        nowhere = aioredis.Redis(port=1, socket_connect_timeout=0.1)
        gateway = GatewayQueue(client, keys, max_depth=10)
        gateway.feed = ResultFeed(client, keys, wakes=client if wakes_reach_redis else nowhere)
        first = asyncio.create_task(_events(gateway, "y"))
        await _until(lambda: gateway.feed.waiting == 1, "the first reader waits")
        reader = gateway.feed._readers[0]
        await _until(lambda: reader._reading.get(keys.result("y"), "0-0") != "0-0",
                     "the read in flight starts past the first entry")  # fmt: skip
        second = asyncio.create_task(_events(gateway, "y"))
        await _until(lambda: gateway.feed.waiting == 2, "the second reader waits")
        publisher.publish_deltas([TokenDelta(request_id="y", offset=2, text="llo")])
        publisher.publish_result(_result("y", "Hello"))
        got = list(await asyncio.gather(first, second))
        await gateway.settle()
        await client.aclose()
        await nowhere.aclose()
        return got

    assert asyncio.run(scenario()) == [["He", "llo", "Hello"]] * 2


def test_the_reader_outlives_an_entry_it_cannot_read(
    redis_client: redis.Redis, keys: Keys, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply the reader fails on (a bug, a corrupt entry) is logged and the read is
    retried: the requests waiting beside it still get their answers."""
    monkeypatch.setattr(feed_module, "RETRY_S", 0.01)
    publisher = WorkerQueue(redis_client, keys, "w")
    real_parse = feed_module.stream_entries
    failures = 1

    def flaky_parse(reply: object) -> object:
        nonlocal failures
        if failures:
            failures -= 1
            raise ValueError("a reply the reader does not understand")
        return real_parse(reply)

    monkeypatch.setattr(feed_module, "stream_entries", flaky_parse)
    publisher.publish_result(_result("z", "fine"))

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        gateway = GatewayQueue(client, keys, max_depth=10)
        got = await _events(gateway, "z")
        await gateway.settle()
        await client.aclose()
        return got

    assert asyncio.run(scenario()) == ["fine"]
    assert failures == 0
