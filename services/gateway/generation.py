"""Submitting requests to the stream and waiting for their answers.

:class:`Generator` is the gateway's one user of :class:`shared.queue.GatewayQueue`. It
turns queue conditions into :class:`ApiError` s: a full queue is 429 (with Retry-After),
no answer in time is 504, an answer with ``finish_reason='error'`` is 500 (``cancelled``:
409), a gateway that is stopping answers what still waits with 503.

Work nobody will read is cancelled through Redis (the worker polls the cancel keys once
per step): a client that left, a deadline that passed, a stop. A body sent with an
``Idempotency-Key`` is not cancelled when its client leaves or the gateway stops: a
retry with the same key is answered from that run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from services.gateway.draining import Shutdown
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from shared.queue import Admitted, GatewayQueue, QueueFull
from shared.schemas import GenerationRequest, GenerationResult, IdempotencyRecord, TokenDelta

log = logging.getLogger(__name__)

Event = TokenDelta | GenerationResult
Watch = Callable[[], Awaitable[Any]]


def failed(result: GenerationResult) -> ApiError:
    """The error a client gets for a request the worker could not answer."""
    return ApiError(
        500,
        f"generation failed on worker {result.worker_id}: {result.error or 'unknown error'}",
        "server_error",
        code="generation_failed",
    )


def unanswered(result: GenerationResult) -> ApiError | None:
    """The error for a final result that is not an answer (failed, or cancelled)."""
    if result.finish_reason == "error":
        return failed(result)
    if result.finish_reason == "cancelled":
        # Only a retry with an Idempotency-Key can read the result of a cancelled run.
        return ApiError(
            409,
            "the run of this request was cancelled before it finished (its deadline passed "
            "or its client left): send it again with a new Idempotency-Key",
            code="request_cancelled",
        )
    return None


def _timeout(timeout_s: float) -> ApiError:
    return ApiError(
        504, f"no answer from a worker within {timeout_s:g}s", "timeout", code="timeout"
    )


def stopping_error(kept: bool) -> ApiError:
    """What a request still waiting when the gateway stops is told."""
    if kept:
        outcome = "its work goes on: retry with the same Idempotency-Key to get its answer"
    else:
        outcome = "its work was cancelled: retry it"
    return ApiError(
        503, f"the gateway is shutting down; {outcome}", "service_unavailable",
        code="shutting_down", headers={"Retry-After": "1"},
    )  # fmt: skip


def client_left() -> ApiError:
    # 499 (nginx's "client closed request"): nobody reads it, the metrics count it.
    return ApiError(499, "the client closed the request", code="client_closed")


class Generator:
    """Admission, submission and answers of the requests of one HTTP body."""

    def __init__(
        self,
        queue: GatewayQueue,
        metrics: GatewayMetrics,
        timeout_s: float,
        retry_after_s: int,
        shutdown: Shutdown | None = None,
        idempotency_ttl_s: int = 3600,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.shutdown = shutdown or Shutdown(drain_s=0.0)
        self.idempotency_ttl_s = idempotency_ttl_s
        self._background: set[asyncio.Task[None]] = set()

    async def submit(
        self,
        requests: list[GenerationRequest],
        idempotency_key: str | None = None,
        record: IdempotencyRecord | None = None,
    ) -> Admitted:
        """Queue every request or none: 429 ApiError when they don't all fit.

        With an idempotency key already used, nothing is queued and the first run's
        record comes back in :attr:`Admitted.record`.
        """
        if self.shutdown.stopping:
            raise stopping_error(kept=False)
        if len(requests) > self.queue.max_depth:
            raise ApiError(
                400,
                f"this body asks for {len(requests)} sequences; the queue holds at most "
                f"{self.queue.max_depth}: send fewer prompts or a smaller n",
                param="n",
                code="too_many_sequences",
            )
        now = time.time()
        for request in requests:
            request.enqueued_at = now
        try:
            return await self.queue.admit(requests, idempotency_key, record, self.idempotency_ttl_s)
        except QueueFull as exc:
            self.metrics.queue_depth.set(exc.depth)
            raise ApiError(
                429,
                f"the request queue is full ({exc.depth} waiting or running, bound "
                f"{exc.bound}, this body needs {len(requests)}); retry later",
                "rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from exc

    def cancel_soon(self, request_ids: list[str], reason: str) -> None:
        """Signal cancel from any context (also a cancelled task): runs in the background."""
        if not request_ids:
            return
        self.metrics.cancels.labels(reason).inc(len(request_ids))
        task = asyncio.create_task(self._cancel(request_ids, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self, timeout_s: float = 2.0) -> None:
        """Wait for the cancel signals and read marks still being sent (before Redis is
        closed)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)
        await self.queue.settle(timeout_s)

    async def _cancel(self, request_ids: list[str], reason: str) -> None:
        try:
            await self.queue.request_cancel(request_ids)
        except Exception as exc:  # the worker then generates to the end: wasteful, not wrong
            log.warning("could not cancel %d request(s) (%s): %s", len(request_ids), reason, exc)

    async def collect(
        self, requests: list[GenerationRequest], left: Watch | None = None, kept: bool = False
    ) -> list[GenerationResult]:
        """The final answers, in request order; ApiError when any failed or timed out.

        ``left`` returns when the client disconnects; ``kept`` (an Idempotency-Key)
        keeps the work running when the client leaves or the gateway stops.
        """
        work = asyncio.ensure_future(self._gather(requests))
        stops = {asyncio.ensure_future(self.shutdown.drained()): "shutdown"}
        if left is not None:
            stops[asyncio.ensure_future(left())] = "client_left"
        ids = [request.id for request in requests]
        try:
            await asyncio.wait({work, *stops}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            reason = next(name for task, name in stops.items() if task.done())
            if not kept:
                self.cancel_soon(ids, reason)
            raise stopping_error(kept) if reason == "shutdown" else client_left()
        except ApiError as exc:
            if exc.code == "timeout":
                self.cancel_soon(ids, "deadline")
            elif exc.code == "generation_failed" and not kept:
                self.cancel_soon(ids, "error")  # a failed choice makes the others useless
            raise
        finally:
            for task in (work, *stops):
                task.cancel()
            await asyncio.gather(work, *stops, return_exceptions=True)

    async def _gather(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        answers = await asyncio.gather(
            *(self._result(request) for request in requests), return_exceptions=True
        )
        results = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            results.append(answer)
        self.queue.mark_read([r.id for r in requests])
        return results

    async def _result(self, request: GenerationRequest) -> GenerationResult:
        try:
            async for event in self.queue.events(request.id, self.timeout_s):
                if isinstance(event, GenerationResult):
                    self.metrics.observe_result(request, event, None)
                    error = unanswered(event)
                    if error is not None:
                        raise error
                    return event
        except TimeoutError as exc:
            raise _timeout(self.timeout_s) from exc
        raise _timeout(self.timeout_s)

    async def stream(
        self, requests: list[GenerationRequest], kept: bool = False
    ) -> AsyncGenerator[tuple[int, Event]]:
        """Events of all requests as they come, tagged with the request's index.

        Ends after every request's result. Closing the iterator early (a client that
        went away) cancels the readers, and the unfinished work unless ``kept``; a
        deadline cancels it always; a stop raises the 503 once the drain time is up.
        """
        inbox: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(index, request, inbox))
            for index, request in enumerate(requests)
        ]
        tasks.append(asyncio.create_task(self._drain_into(inbox, kept)))
        unfinished = {request.id for request in requests}
        reason = "client_left"
        try:
            while unfinished:
                index, event = await inbox.get()
                if isinstance(event, BaseException):
                    reason = _reason(event)
                    raise event
                if isinstance(event, GenerationResult):
                    unfinished.discard(event.request_id)
                    if unanswered(event) is not None:
                        reason = "error"  # the stream ends on it: the others are useless
                yield index, event
            self.queue.mark_read([r.id for r in requests])
        finally:
            # Before any await: a disconnect arrives as an anyio cancel scope, which
            # cancels every await made in it, this cleanup's included.
            if unfinished and (reason == "deadline" or not kept):
                self.cancel_soon(sorted(unfinished), reason)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain_into(
        self, inbox: asyncio.Queue[tuple[int, Event | BaseException]], kept: bool
    ) -> None:
        await self.shutdown.drained()
        await inbox.put((-1, stopping_error(kept)))

    async def _pump(
        self,
        index: int,
        request: GenerationRequest,
        inbox: asyncio.Queue[tuple[int, Event | BaseException]],
    ) -> None:
        first_token_at: float | None = None
        try:
            async for event in self.queue.events(request.id, self.timeout_s):
                if isinstance(event, TokenDelta) and first_token_at is None:
                    first_token_at = time.time()
                if isinstance(event, GenerationResult):
                    self.metrics.observe_result(request, event, first_token_at)
                await inbox.put((index, event))
        except TimeoutError:
            await inbox.put((index, _timeout(self.timeout_s)))
        except Exception as exc:  # a Redis failure: reported to the client as an error event
            log.warning("reading the answer of %s failed: %s", request.id, exc)
            await inbox.put((index, exc))


def _reason(error: BaseException) -> str:
    if isinstance(error, ApiError) and error.code == "timeout":
        return "deadline"
    if isinstance(error, ApiError) and error.code == "shutting_down":
        return "shutdown"
    return "error"
