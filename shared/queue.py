"""The request hot path over Redis Streams: submit, pull, reclaim, answer, acknowledge.

Delivery is at-least-once. A request stays pending in the ``workers`` consumer group
until the worker that answered it acknowledges it; entries left pending by a dead worker
are reclaimed (XAUTOCLAIM) by a live one after ``visibility_timeout_s``, and a worker
running a long batch keeps its claim fresh (:meth:`WorkerQueue.refresh_claims`).
Answers go to a per-request result stream with a TTL; a ``done`` marker makes the final
answer of a redelivered request be published once. A result stream keeps at most
``RESULT_MAXLEN`` deltas and lives ``RESULT_READ_TTL_S`` once its reader has the answer.

Admission is one script (:data:`ADMIT`): every sequence of an HTTP body is queued, or
none is, against a bound that counts both the backlog and what workers hold. A client
that leaves (or a deadline that passes) sets a per-request cancel key the worker polls
once per step (:meth:`WorkerQueue.cancelled`); a request that failed too many
deliveries is dead-lettered (:meth:`WorkerQueue.dead_letter`).

Two clients: :class:`WorkerQueue` (sync redis-py, used by workers and jobs) and
:class:`GatewayQueue` (redis.asyncio, used by the gateway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from shared.feed import ResultFeed, stream_entries
from shared.keys import WORKER_GROUP, Keys
from shared.replies import as_text
from shared.schemas import (
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    IdempotencyRecord,
    TokenDelta,
    dump,
    load,
    now,
)

log = logging.getLogger(__name__)

FIELD = "data"
KIND = "kind"
# KEYS: done marker, result stream; ARGV: ttl seconds, result JSON. 1 if published.
PUBLISH_ONCE = f"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], '*', '{KIND}', 'result', '{FIELD}', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""
RESULT_TTL_S = 900
# Deltas kept per result stream: a reader that falls this far behind still gets the
# whole text from the final result, which is never trimmed (it is the last entry).
RESULT_MAXLEN = 1000
# Once the gateway has read a final answer, its stream only needs to outlive a slow
# second reader (a concurrent retry with the same Idempotency-Key).
RESULT_READ_TTL_S = 30
# A cancel key must outlive the request's stay in the queue and a redelivery.
CANCEL_TTL_S = 900
# A worker re-reads every running request's cancel key at least this often, even when
# the cancels counter did not move (a counter lost with a Redis restart, say).
CANCEL_RECHECK_S = 1.0
DEAD_LETTER_MAXLEN = 1000
PREVIEW_CHARS = 200

# KEYS: requests stream, [idempotency record]; ARGV: bound, group, record JSON, record
# TTL, then one request JSON per sequence. The bound counts what no worker has read yet
# (the group's lag) plus what workers hold (pending); XLEN when the group's lag is
# unknown (no group yet). Returns {status, depth or record}.
ADMIT = f"""
if KEYS[2] then
  local record = redis.call('GET', KEYS[2])
  if record then return {{'duplicate', record}} end
end
local depth = redis.call('XLEN', KEYS[1])
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, group in ipairs(groups) do
    local info = {{}}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[2] and info['lag'] then depth = info['lag'] + info['pending'] end
  end
end
local count = #ARGV - 4
if depth + count > tonumber(ARGV[1]) then return {{'full', depth}} end
for i = 5, #ARGV do redis.call('XADD', KEYS[1], '*', '{FIELD}', ARGV[i]) end
if KEYS[2] then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
return {{'admitted', depth}}
"""

# KEYS: done marker, result stream, dead-letter stream, dead-letter counter, requests;
# ARGV: result TTL, result JSON, dead letter JSON, dead-letter cap, group, entry id.
# Answers the client (once), records the dead letter and acks, all or nothing.
DEAD_LETTER = f"""
local published = 0
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', '{KIND}', 'result', '{FIELD}', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', '{FIELD}', ARGV[3])
  redis.call('INCR', KEYS[4])
  published = 1
end
redis.call('XACK', KEYS[5], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[5], ARGV[6])
return published
"""


class QueueFull(Exception):
    """The queue (backlog plus what workers hold) has no room for a whole body."""

    def __init__(self, depth: int, bound: int) -> None:
        super().__init__(f"queue depth {depth} is over its bound {bound}")
        self.depth = depth
        self.bound = bound


@dataclass
class Delivery:
    """A request as delivered to a worker: the stream entry id is needed to ack it."""

    entry_id: str
    request: GenerationRequest
    deliveries: int = 1


def _entries(reply: Any) -> list[tuple[str, dict[Any, Any]]]:
    """The entries of a one-stream XREAD/XREADGROUP reply (RESP2 list or RESP3 map)."""
    streams = stream_entries(reply)
    return streams[0][1] if streams else []


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    """Create the consumer group (and the stream) if they don't exist yet."""
    try:
        client.xgroup_create(keys.requests, WORKER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class WorkerQueue:
    """A worker's side of the stream: one consumer of the ``workers`` group."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        consumer: str,
        visibility_timeout_s: float = 30.0,
        max_deliveries: int = 5,
        result_ttl_s: int = RESULT_TTL_S,
    ) -> None:
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.result_ttl_s = result_ttl_s
        self._publish_once = client.register_script(PUBLISH_ONCE)
        self._dead_letter = client.register_script(DEAD_LETTER)
        self._next_reclaim = 0.0
        self._cancels_seen: Any = None  # the cancels counter at the last full check
        self._cancel_checked: set[str] = set()  # ids whose keys were read since then
        self._cancel_checked_at = 0.0
        self._cancel_found: set[str] = set()  # checked ids found cancelled
        ensure_group(client, keys)

    def pull(self, count: int, block_ms: int = 1000) -> list[Delivery]:
        """Up to ``count`` requests: first those a dead worker left, then new ones.

        Dead workers' entries are looked for at most every quarter of the visibility
        timeout (up to a second): they wait that long anyway, and a worker pulls every
        engine step.
        """
        deliveries: list[Delivery] = []
        if time.monotonic() >= self._next_reclaim:
            deliveries = self.reclaim(count)
            self._next_reclaim = time.monotonic() + min(1.0, self.visibility_ms / 4000)
        if len(deliveries) < count:
            deliveries += self._read_new(count - len(deliveries), 0 if deliveries else block_ms)
        return deliveries

    def _read_new(self, count: int, block_ms: int) -> list[Delivery]:
        reply = self.client.xreadgroup(
            WORKER_GROUP,
            self.consumer,
            {self.keys.requests: ">"},
            count=count,
            block=block_ms or None,
        )
        return self._parse(_entries(reply), {})

    def reclaim(self, count: int) -> list[Delivery]:
        """Take over entries pending longer than the visibility timeout (a dead worker's)."""
        reply: Any = self.client.xautoclaim(
            self.keys.requests, WORKER_GROUP, self.consumer, self.visibility_ms, "0-0", count=count
        )
        entries = [entry for entry in reply[1] if entry and entry[1]]
        if not entries:
            return []
        counts = self._delivery_counts([as_text(entry_id) for entry_id, _ in entries])
        log.warning("reclaimed %d request(s) left pending by another worker", len(entries))
        return self._parse(entries, counts)

    def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        """Each entry's delivery count, one exact range per entry in one round trip (one
        range over all of them could be filled by entries other workers hold between)."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.keys.requests, WORKER_GROUP, min=entry_id, max=entry_id,
                                count=1)  # fmt: skip
        counts = {}
        for pending in pipe.execute():
            for p in pending:
                counts[as_text(p["message_id"])] = int(p["times_delivered"])
        return counts

    def _parse(self, entries: Iterable[tuple], counts: dict[str, int]) -> list[Delivery]:
        deliveries = []
        for raw_id, fields in entries:
            entry_id = as_text(raw_id)
            try:
                request = load(GenerationRequest, _field(fields, FIELD))
            except (KeyError, ValidationError) as exc:
                # A malformed entry can never succeed: drop it rather than loop on it.
                log.error("dropping malformed stream entry %s: %s", entry_id, exc)
                self.ack([entry_id])
                continue
            deliveries.append(Delivery(entry_id, request, counts.get(entry_id, 1)))
        return deliveries

    def refresh_claims(self, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this worker still holds (a long batch)."""
        self._set_idle(entry_ids, 0)

    def release(self, entry_ids: list[str]) -> None:
        """Hand entries back unstarted: idle past the timeout, any worker reclaims them now."""
        self._set_idle(entry_ids, self.visibility_ms + 1)

    def _set_idle(self, entry_ids: list[str], idle_ms: int) -> None:
        if entry_ids:
            self.client.xclaim(
                self.keys.requests, WORKER_GROUP, self.consumer, 0, list[Any](entry_ids),
                idle=idle_ms, justid=True,
            )  # fmt: skip

    def answered(self, request_ids: list[str]) -> set[str]:
        """Those whose final answer is already published (redeliveries), in one round trip."""
        if not request_ids:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.exists(self.keys.done(request_id))
        return {rid for rid, found in zip(request_ids, pipe.execute(), strict=True) if found}

    def cancelled(self, request_ids: list[str]) -> set[str]:
        """Those whose client left or whose deadline passed.

        Meant to be called once per engine step with the running requests' ids. Reading
        hundreds of cancel keys every step took 3.6 ms a step (cProfile, H200 host), so the
        keys read are those of requests new since the last call, plus all of them when
        the cancels counter moved (a cancel key is set before its counter is raised) or
        ``CANCEL_RECHECK_S`` passed: one round trip when nothing changed.
        """
        if not request_ids:
            self._cancel_checked, self._cancel_found = set(), set()
            return set()
        fresh = [rid for rid in request_ids if rid not in self._cancel_checked]
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.cancels)
        if fresh:
            pipe.mget([self.keys.cancel(rid) for rid in fresh])
        seen, *flags = pipe.execute()
        recheck = time.monotonic() - self._cancel_checked_at >= CANCEL_RECHECK_S
        if seen != self._cancels_seen or recheck:
            fresh = request_ids
            flags = [self.client.mget([self.keys.cancel(rid) for rid in fresh])]
            self._cancels_seen, self._cancel_checked_at = seen, time.monotonic()
        self._cancel_checked = set(request_ids)
        found = flags[0] if flags else []
        new = {rid for rid, flag in zip(fresh, found, strict=True) if flag is not None}
        # Once seen, a cancel stands (its key is not read again while the counter rests).
        self._cancel_found = (self._cancel_found & self._cancel_checked) | new
        return set(self._cancel_found)

    def dead_letter(self, delivery: Delivery, error: str, model: str, worker_id: str) -> bool:
        """Give up on a request: answer its client with ``error`` once, record, ack.

        The error result, the dead-letter entry and the ack are one script, so a worker
        killed half-way leaves the request either untouched or wholly dead-lettered.
        Returns False when another delivery had already answered it (nothing recorded).
        """
        request = delivery.request
        reason = f"request failed {delivery.deliveries} deliveries and was given up: {error}"
        result = GenerationResult(
            request_id=request.id, text="", finish_reason="error",
            prompt_tokens=request.prompt_len, completion_tokens=0, model=model,
            worker_id=worker_id, queued_at=request.enqueued_at, started_at=now(), error=reason,
        )  # fmt: skip
        letter = DeadLetter(
            request_id=request.id, entry_id=delivery.entry_id, deliveries=delivery.deliveries,
            error=error, worker_id=worker_id, model=model, prompt_tokens=request.prompt_len,
            prompt_preview=request.prompt[:PREVIEW_CHARS], params=request.params,
        )  # fmt: skip
        keys = [
            self.keys.done(request.id), self.keys.result(request.id), self.keys.dead_letters,
            self.keys.dead_letter_count, self.keys.requests,
        ]  # fmt: skip
        args: list[str | int] = [
            self.result_ttl_s, dump(result), dump(letter), DEAD_LETTER_MAXLEN, WORKER_GROUP,
            delivery.entry_id,
        ]  # fmt: skip
        published = bool(self._dead_letter(keys=keys, args=args))
        if published:
            log.error("dead-lettered %s after %d deliveries: %s", request.id,
                      delivery.deliveries, error)  # fmt: skip
        return published

    def publish_deltas(self, deltas: list[TokenDelta]) -> None:
        """Publish many deltas in one round trip (one per streaming request and step)."""
        if not deltas:
            return
        pipe = self.client.pipeline(transaction=False)
        for delta in deltas:
            key = self.keys.result(delta.request_id)
            pipe.xadd(key, {KIND: "delta", FIELD: dump(delta)}, maxlen=RESULT_MAXLEN)
            pipe.expire(key, self.result_ttl_s)
        pipe.execute()

    def publish_result(self, result: GenerationResult) -> bool:
        """Publish one final answer once; False when another delivery already did."""
        return self.publish_results([result])[0]

    def publish_results(self, results: list[GenerationResult]) -> list[bool]:
        """Publish final answers in one round trip; per result, whether this call did.

        The ``done`` marker and the answer are written in one script: a worker killed
        between the two would otherwise leave a request marked answered that nobody
        ever answers (its redelivery would be skipped as done).
        """
        pipe = self.client.pipeline(transaction=False)
        for result in results:
            keys = [self.keys.done(result.request_id), self.keys.result(result.request_id)]
            self._publish_once(keys=keys, args=[self.result_ttl_s, dump(result)], client=pipe)
        return [bool(done) for done in pipe.execute()]

    def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete answered entries, so the stream length is the backlog."""
        if entry_ids:
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.keys.requests, WORKER_GROUP, *entry_ids)
            pipe.xdel(self.keys.requests, *entry_ids)
            pipe.execute()

    def depth(self) -> int:
        return int(self.client.xlen(self.keys.requests))

    def submit(self, request: GenerationRequest) -> str:
        """Queue a request (used by batch jobs, which run outside the gateway)."""
        return as_text(self.client.xadd(self.keys.requests, {FIELD: dump(request)}))

    def wait_result(self, request_id: str, timeout_s: float) -> GenerationResult | None:
        """Block until the final answer of a request arrives, or ``None`` on timeout."""
        key, last, deadline = self.keys.result(request_id), "0", _Deadline(timeout_s)
        while not deadline.expired():
            reply = self.client.xread({key: last}, block=deadline.block_ms())
            for entry_id, fields in _entries(reply):
                last = as_text(entry_id)
                event = parse_event(fields)
                if isinstance(event, GenerationResult):
                    return event
        return None


def _field(fields: dict, name: str) -> bytes | str:
    return fields[name.encode()] if name.encode() in fields else fields[name]


def parse_event(fields: dict) -> TokenDelta | GenerationResult:
    """Decode one entry of a result stream (its ``kind`` field says which model)."""
    if as_text(_field(fields, KIND)) == "result":
        return load(GenerationResult, _field(fields, FIELD))
    return load(TokenDelta, _field(fields, FIELD))


@dataclass
class Admitted:
    """A body's sequences were queued (``record`` is None) or already were, by the
    first run of the same ``Idempotency-Key`` (``record`` says what that run was)."""

    depth: int = 0
    record: IdempotencyRecord | None = None


class GatewayQueue:
    """The gateway's side: admission, submission, cancellation, and waiting for answers."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        max_depth: int,
        reads: aioredis.Redis | None = None,
    ) -> None:
        """``reads``: the client whose connections block reading answers (``client``'s
        by default; a bounded pool of commands should not lend its own)."""
        self.client = client
        self.keys = keys
        self.max_depth = max_depth
        self._admit = client.register_script(ADMIT)
        self.feed = ResultFeed(reads or client, keys, wakes=client)
        self._read: list[str] = []
        self._marking: asyncio.Task[None] | None = None

    async def depth(self) -> int:
        return int(await self.client.xlen(self.keys.requests))

    async def submit(self, request: GenerationRequest) -> None:
        """Queue one request, or raise :class:`QueueFull` when there is no room."""
        await self.admit([request])

    async def admit(
        self,
        requests: list[GenerationRequest],
        idempotency_key: str | None = None,
        record: IdempotencyRecord | None = None,
        record_ttl_s: int = 3600,
    ) -> Admitted:
        """Queue all ``requests`` or none (:class:`QueueFull`), in one script.

        With ``idempotency_key``, ``record`` is stored under it with the requests; when
        a record is already there nothing is queued and that record is returned.
        """
        keys = [self.keys.requests]
        if idempotency_key is not None:
            keys.append(self.keys.idempotency(idempotency_key))
        record_json = dump(record) if record is not None else ""
        args: list[str | int] = [self.max_depth, WORKER_GROUP, record_json, record_ttl_s]
        status, value = await self._admit(keys=keys, args=args + [dump(r) for r in requests])
        status = as_text(status)
        if status == "duplicate":
            return Admitted(record=load(IdempotencyRecord, value))
        if status == "full":
            raise QueueFull(int(value), self.max_depth)
        return Admitted(depth=int(value))

    async def save_results(
        self, idempotency_key: str, record: IdempotencyRecord, results: list[GenerationResult]
    ) -> None:
        """Keep a finished body's answers under its key (same TTL) for later retries."""
        done = record.model_copy(update={"results": results})
        await self.client.set(self.keys.idempotency(idempotency_key), dump(done), xx=True,
                              keepttl=True)  # fmt: skip

    async def request_cancel(self, request_ids: list[str], ttl_s: int = CANCEL_TTL_S) -> None:
        """Tell workers to stop generating these requests (client gone, deadline passed)."""
        if not request_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.set(self.keys.cancel(request_id), "1", ex=ttl_s)
        pipe.incr(self.keys.cancels)  # after the keys: a worker that sees it finds them
        await pipe.execute()

    async def finish_reading(self, request_ids: list[str]) -> None:
        """The answers were read: their result streams expire soon instead of in 15 min."""
        if not request_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.expire(self.keys.result(request_id), RESULT_READ_TTL_S)
        await pipe.execute()

    def mark_read(self, request_ids: list[str]) -> None:
        """:meth:`finish_reading` in the background, batched: no round trip of its own.

        The ids marked by every request until the writer runs go in one pipeline, off
        the answer's path. A failure (Redis away) leaves those streams to expire at
        their publish TTL instead: memory held a while longer, nothing lost.
        """
        if not request_ids:
            return
        self._read.extend(request_ids)
        if self._marking is None:
            self._marking = asyncio.get_running_loop().create_task(self._write_marks())

    async def _write_marks(self) -> None:
        try:
            while self._read:
                request_ids, self._read = self._read, []
                try:
                    await self.finish_reading(request_ids)
                except Exception as exc:
                    log.warning("could not shorten the TTL of %d read result stream(s): %s",
                                len(request_ids), exc)  # fmt: skip
        finally:
            self._marking = None

    async def settle(self, timeout_s: float = 2.0) -> None:
        """Wait for the marks still being written and stop reading result streams
        (before the client is closed)."""
        if self._marking is not None:
            await asyncio.wait({self._marking}, timeout=timeout_s)
        await self.feed.close()

    async def events(
        self, request_id: str, timeout_s: float
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Events of one request in order, ending with its result; TimeoutError if none.

        A redelivered request may resend text already streamed: deltas are passed on
        only for characters past those already yielded. A Redis that restarts (or is
        loading its AOF) is waited for until the deadline: the request is not lost.
        """
        sent = 0
        batches = self.feed.entries(self.keys.result(request_id), timeout_s)
        try:
            async with aclosing(batches):  # leaves the reads as soon as the answer is in
                async for entries in batches:
                    for _, fields in entries:
                        event = parse_event(fields)
                        if isinstance(event, GenerationResult):
                            yield event
                            return
                        if event.offset + len(event.text) > sent:
                            new_text = event.text[max(0, sent - event.offset) :]
                            sent = event.offset + len(event.text)
                            yield TokenDelta(
                                request_id=request_id, offset=sent - len(new_text), text=new_text
                            )
        except TimeoutError:
            pass
        raise TimeoutError(f"no answer to request {request_id} within {timeout_s:.0f}s")


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.end = time.monotonic() + timeout_s

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def block_ms(self) -> int:
        return max(1, min(1000, int(self.remaining() * 1000)))
