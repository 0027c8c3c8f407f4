"""The request hot path over Redis Streams: submit, pull, reclaim, answer, acknowledge.

Delivery is at-least-once. A request stays pending in the ``workers`` consumer group
until the worker that answered it acknowledges it; entries left pending by a dead worker
are reclaimed (XAUTOCLAIM) by a live one after ``visibility_timeout_s``, and a worker
running a long batch keeps its claim fresh (:meth:`WorkerQueue.refresh_claims`).
Answers go to a per-request result stream with a TTL; a ``done`` marker makes the final
answer of a redelivered request be published once.

Two clients: :class:`WorkerQueue` (sync redis-py, used by workers and jobs) and
:class:`GatewayQueue` (redis.asyncio, used by the gateway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from shared.keys import WORKER_GROUP, Keys
from shared.replies import as_text
from shared.schemas import GenerationRequest, GenerationResult, TokenDelta, dump, load

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


class QueueFull(Exception):
    """The request stream is deeper than the admission bound."""

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


def _entries(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """The entries of a one-stream XREAD/XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0])
    return list(reply[0][1])


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
        ensure_group(client, keys)

    def pull(self, count: int, block_ms: int = 1000) -> list[Delivery]:
        """Up to ``count`` requests: first those a dead worker left, then new ones."""
        deliveries = self.reclaim(count)
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
        first, last = min(entry_ids), max(entry_ids)
        pending: Any = self.client.xpending_range(
            self.keys.requests, WORKER_GROUP, min=first, max=last, count=len(entry_ids) * 4
        )
        return {as_text(p["message_id"]): int(p["times_delivered"]) for p in pending}

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

    def publish_deltas(self, deltas: list[TokenDelta]) -> None:
        """Publish many deltas in one round trip (one per streaming request and step)."""
        if not deltas:
            return
        pipe = self.client.pipeline(transaction=False)
        for delta in deltas:
            key = self.keys.result(delta.request_id)
            pipe.xadd(key, {KIND: "delta", FIELD: dump(delta)})
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


class GatewayQueue:
    """The gateway's side: admission, submission, and waiting for answers."""

    def __init__(self, client: aioredis.Redis, keys: Keys, max_depth: int) -> None:
        self.client = client
        self.keys = keys
        self.max_depth = max_depth

    async def depth(self) -> int:
        return int(await self.client.xlen(self.keys.requests))

    async def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise :class:`QueueFull` when the backlog is over its bound."""
        depth = await self.depth()
        if depth >= self.max_depth:
            raise QueueFull(depth, self.max_depth)
        await self.client.xadd(self.keys.requests, {FIELD: dump(request)})

    async def events(
        self, request_id: str, timeout_s: float
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Events of one request in order, ending with its result; TimeoutError if none.

        A redelivered request may resend text already streamed: deltas are passed on
        only for characters past those already yielded.
        """
        key, last, sent = self.keys.result(request_id), "0", 0
        loop_deadline = _Deadline(timeout_s)
        while not loop_deadline.expired():
            reply = await self.client.xread({key: last}, block=loop_deadline.block_ms())
            for entry_id, fields in _entries(reply):
                last = as_text(entry_id)
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
        raise TimeoutError(f"no answer to request {request_id} within {timeout_s:.0f}s")


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.end = time.monotonic() + timeout_s

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def block_ms(self) -> int:
        return max(1, min(1000, int((self.end - time.monotonic()) * 1000)))
