"""Submitting requests to the stream and waiting for their answers.

:class:`Generator` is the gateway's one user of :class:`shared.queue.GatewayQueue`. It
turns queue conditions into :class:`ApiError` s: a full queue is 429 (with Retry-After),
no answer in time is 504, an answer with ``finish_reason='error'`` is 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from shared.queue import GatewayQueue, QueueFull
from shared.schemas import GenerationRequest, GenerationResult, TokenDelta

log = logging.getLogger(__name__)

Event = TokenDelta | GenerationResult


def failed(result: GenerationResult) -> ApiError:
    """The error a client gets for a request the worker could not answer."""
    return ApiError(
        500,
        f"generation failed on worker {result.worker_id}: {result.error or 'unknown error'}",
        "server_error",
        code="generation_failed",
    )


def _timeout(timeout_s: float) -> ApiError:
    return ApiError(
        504, f"no answer from a worker within {timeout_s:g}s", "timeout", code="timeout"
    )


class Generator:
    """Admission, submission and answers of the requests of one HTTP body."""

    def __init__(
        self, queue: GatewayQueue, metrics: GatewayMetrics, timeout_s: float, retry_after_s: int
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s

    async def submit(self, requests: list[GenerationRequest]) -> None:
        """Queue every request; 429 ApiError when the backlog is over its bound."""
        try:
            for request in requests:
                request.enqueued_at = time.time()
                await self.queue.submit(request)
        except QueueFull as exc:
            self.metrics.queue_depth.set(exc.depth)
            raise ApiError(
                429,
                f"the request queue is full ({exc.depth} waiting, bound {exc.bound}); retry later",
                "rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from exc

    async def collect(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """The final answers, in request order; ApiError when any failed or timed out."""
        answers = await asyncio.gather(
            *(self._result(request) for request in requests), return_exceptions=True
        )
        results = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            results.append(answer)
        return results

    async def _result(self, request: GenerationRequest) -> GenerationResult:
        try:
            async for event in self.queue.events(request.id, self.timeout_s):
                if isinstance(event, GenerationResult):
                    self.metrics.observe_result(request, event, None)
                    if event.finish_reason == "error":
                        raise failed(event)
                    return event
        except TimeoutError as exc:
            raise _timeout(self.timeout_s) from exc
        raise _timeout(self.timeout_s)

    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[tuple[int, Event]]:
        """Events of all requests as they come, tagged with the request's index.

        Ends after every request's result. Closing the iterator (a client that went
        away) cancels the readers; nothing is left running.
        """
        inbox: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(index, request, inbox))
            for index, request in enumerate(requests)
        ]
        try:
            remaining = len(tasks)
            while remaining:
                index, event = await inbox.get()
                if isinstance(event, BaseException):
                    raise event
                remaining -= isinstance(event, GenerationResult)
                yield index, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
