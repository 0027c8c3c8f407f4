"""The gateway's reads of result streams: every waiting request through a few blocking reads.

A request's answers go to its own stream (:meth:`shared.keys.Keys.result`). Reading
each one with its own blocking ``XREAD`` holds a Redis connection per waiting request:
a burst of 512 requests opened a connection each (a fifth of the gateway's CPU, the
connect and its address lookup), and every answer came back in a round trip of its own.
A :class:`ResultFeed` instead runs one reader task per ``per_reader`` waiting requests;
each reader blocks in one ``XREAD`` over all of its requests' streams and hands each
entry to the request that waits for it. Everything that is ready comes back in one
reply: the answers of a whole step in one round trip.

A request that starts waiting while its reader is blocked would be missed until that
read returns, so the reader also reads its own small wake stream
(:meth:`shared.keys.Keys.result_wake`): a new waiter adds an entry to it, at most once
per read. The read asks for entries after the last one seen, so a wake that reaches
Redis before the read itself still ends it at once.

The reader survives Redis going away (a restart, an AOF load): it retries, and a waiter
keeps its place in its stream, so nothing already published is skipped; each waiter's
own deadline bounds how long it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.replies import as_text

log = logging.getLogger(__name__)

Entry = tuple[str, dict[Any, Any]]
# A reader re-reads at least this often: streams of requests that stopped waiting leave
# its read, which is also how long it takes to notice an idle reader's changes.
BLOCK_MS = 1000
# Streams per reader: an XREAD names every one of them, so its cost grows with them.
PER_READER = 256
RETRY_S = 0.5
# How long a closing reader waits for its read to end once woken.
CLOSE_S = 2.0
# A gateway that dies leaves its wake streams behind for this long.
WAKE_TTL_S = 3600


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as a tuple that sorts as Redis orders them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def stream_entries(reply: Any) -> list[tuple[str, list[Entry]]]:
    """(stream, entries) of a multi-stream XREAD reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    streams = []
    for stream, entries in pairs:
        # RESP3 wraps a stream's entries in one more list.
        rows = entries[0] if isinstance(reply, dict) else entries
        streams.append((as_text(stream), [(as_text(i), fields) for i, fields in rows]))
    return streams


@dataclass(eq=False)
class _Waiter:
    """One request waiting for its stream's entries past ``last``."""

    key: str
    last: str = "0-0"
    # Entries handed on and not yet taken by the request, and the future it awaits
    # while there are none (lighter than an asyncio.Queue, made for each request).
    pending: list[Entry] = field(default_factory=list)
    arrived: asyncio.Future[None] | None = None

    def take(self, entries: list[Entry]) -> None:
        after = entry_order(self.last)
        fresh = [e for e in entries if entry_order(e[0]) > after]
        if fresh:
            self.last = fresh[-1][0]
            self.pending.extend(fresh)
            if self.arrived is not None and not self.arrived.done():
                self.arrived.set_result(None)

    async def next_batch(self) -> list[Entry]:
        """Every entry handed on since the last call, waiting for one if there is none."""
        if not self.pending:
            self.arrived = asyncio.get_running_loop().create_future()
            try:
                await self.arrived
            finally:
                self.arrived = None
        batch, self.pending = self.pending, []
        return batch


def _earliest(waiters: list[_Waiter]) -> str:
    """Where the read of a stream several requests wait on starts (a retry with the same
    ``Idempotency-Key`` reads its first run's stream too)."""
    return min(waiters, key=lambda w: entry_order(w.last)).last


class _Reader:
    """One blocking XREAD over the streams of up to ``PER_READER`` waiting requests."""

    def __init__(self, client: aioredis.Redis, wakes: aioredis.Redis, wake_key: str) -> None:
        self.client = client
        self.wakes = wakes
        self.wake_key = wake_key
        self.waiters: dict[str, list[_Waiter]] = {}
        self.count = 0
        self._wake_last = "0-0"
        self._reading: dict[str, str] = {}  # stream -> where the read in flight starts
        self._woken = False  # a wake was sent during the read in flight
        self._changed = asyncio.Event()
        self._closing = False
        self._expiry_due = 0.0
        self._waking: set[asyncio.Task[None]] = set()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def add(self, waiter: _Waiter) -> None:
        self.waiters.setdefault(waiter.key, []).append(waiter)
        self.count += 1
        self._changed.set()
        if self._reading and not self._woken and not self._covers(waiter):
            self._woken = True
            task = asyncio.get_running_loop().create_task(self._wake())
            self._waking.add(task)
            task.add_done_callback(self._waking.discard)

    def _covers(self, waiter: _Waiter) -> bool:
        """Whether the read in flight returns every entry ``waiter`` lacks."""
        start = self._reading.get(waiter.key)
        return start is not None and entry_order(start) <= entry_order(waiter.last)

    def remove(self, waiter: _Waiter) -> None:
        same = self.waiters.get(waiter.key, [])
        if waiter in same:
            same.remove(waiter)
            self.count -= 1
            if not same:
                del self.waiters[waiter.key]

    async def _wake(self) -> None:
        try:
            pipe = self.wakes.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"wake": "1"}, maxlen=1, approximate=False)
            clock = time.monotonic()
            if clock >= self._expiry_due:  # the TTL is refreshed now and then, not each wake
                pipe.expire(self.wake_key, WAKE_TTL_S)
                self._expiry_due = clock + WAKE_TTL_S / 2
            await pipe.execute()
        except redis.RedisError as exc:  # the read ends by itself within BLOCK_MS
            log.debug("could not wake a result reader: %s", exc)

    async def _run(self) -> None:
        while not self._closing:
            if not self.waiters:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                await self._read_once()
            except Exception:  # a bad entry must not leave every waiting request unread
                log.exception("reading result streams failed; retrying")
                self._reading = {}
                await asyncio.sleep(RETRY_S)
            # The requests just answered leave before the next read names their streams.
            await asyncio.sleep(0)

    async def _read_once(self) -> None:
        streams = {key: ws[0].last if len(ws) == 1 else _earliest(ws)
                   for key, ws in self.waiters.items()}  # fmt: skip
        self._reading, self._woken = dict(streams), False
        streams[self.wake_key] = self._wake_last
        try:
            reply = await self.client.xread(streams, block=BLOCK_MS)  # type: ignore[arg-type]
        except redis.RedisError as exc:  # Redis away or loading: the waiters keep their place
            self._reading = {}
            log.warning("reading result streams: %s; retrying", exc)
            await asyncio.sleep(RETRY_S)
            return
        for key, entries in stream_entries(reply):
            if key == self.wake_key:
                self._wake_last = entries[-1][0]
                continue
            for waiter in list(self.waiters.get(key, ())):
                if self._covers(waiter):  # else it came in later, earlier in the stream
                    waiter.take(entries)
        self._reading = {}

    async def close(self) -> None:
        """End the loop: a read in flight is woken, not cancelled (a read cancelled
        mid-reply leaves its connection in an unknown state)."""
        self._closing = True
        self._changed.set()
        if self._reading:
            await self._wake()
        await asyncio.wait({self.task}, timeout=CLOSE_S)
        for task in (self.task, *self._waking):
            task.cancel()
        await asyncio.gather(self.task, *self._waking, return_exceptions=True)
        with contextlib.suppress(redis.RedisError):  # else it expires
            await self.wakes.delete(self.wake_key)


class ResultFeed:
    """Entries of result streams for the requests waiting in one event loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        per_reader: int = PER_READER,
        wakes: aioredis.Redis | None = None,
    ) -> None:
        """Readers block on connections of ``client``; wakes go through ``wakes``
        (``client`` by default)."""
        self.client = client
        self.wakes = wakes or client
        self.keys = keys
        self.per_reader = per_reader
        self.name = uuid.uuid4().hex[:12]
        self._readers: list[_Reader] = []

    async def entries(self, key: str, timeout_s: float) -> AsyncGenerator[list[Entry]]:
        """Batches of the entries of stream ``key``, from its first, as they arrive;
        TimeoutError once ``timeout_s`` has passed without the caller having stopped.

        The stream leaves the reads when the caller stops iterating.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        waiter = _Waiter(key)
        reader = self._reader()
        reader.add(waiter)
        try:
            while True:
                # Only the wait is bounded, never the caller's work between batches.
                async with asyncio.timeout_at(deadline):
                    batch = await waiter.next_batch()
                yield batch
        finally:
            reader.remove(waiter)

    def _reader(self) -> _Reader:
        for reader in self._readers:
            if reader.count < self.per_reader:
                return reader
        index = len(self._readers)
        wake_key = self.keys.result_wake(f"{self.name}-{index}")
        reader = _Reader(self.client, self.wakes, wake_key)
        self._readers.append(reader)
        return reader

    @property
    def waiting(self) -> int:
        """Requests waiting for entries now."""
        return sum(reader.count for reader in self._readers)

    async def close(self) -> None:
        """Stop the readers (before the client is closed)."""
        readers, self._readers = self._readers, []
        await asyncio.gather(*(reader.close() for reader in readers))
