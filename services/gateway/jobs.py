"""Batch jobs run by an RQ worker (``rq worker <prefix>-jobs``); no FastAPI here.

:func:`run_batch` is the job function: it queues the job's requests on the same stream
as interactive traffic, at most ``window`` at a time (so a 1000-prompt job does not fill
the queue and get interactive requests refused), waits for each answer, keeps
``job.meta['progress']`` = ``{done, total}`` current, and returns the results as dicts
(:class:`GenerationResult` fields) in request order. A request with no answer in time
gets an ``error`` result instead of failing the whole job.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import redis
from rq import get_current_job

from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import GenerationRequest, GenerationResult, load, now

log = logging.getLogger(__name__)

JOBS_CONSUMER = "rq-jobs"


def _timed_out(request: GenerationRequest, timeout_s: float) -> GenerationResult:
    return GenerationResult(
        request_id=request.id,
        text="",
        finish_reason="error",
        prompt_tokens=request.prompt_len,
        completion_tokens=0,
        model="",
        worker_id="",
        queued_at=request.enqueued_at,
        started_at=request.enqueued_at,
        error=f"no answer within {timeout_s:g}s",
    )


def _progress_reporter(total: int) -> Callable[[int], None]:
    """A callback saving ``{done, total}`` in the current RQ job's meta (no-op outside RQ)."""
    job = get_current_job()

    def report(done: int) -> None:
        if job is not None:
            job.meta["progress"] = {"done": done, "total": total}
            job.save_meta()

    return report


def run_requests(
    queue: WorkerQueue,
    requests: list[GenerationRequest],
    timeout_s: float,
    window: int,
    report: Callable[[int], None],
) -> list[GenerationResult]:
    """Submit with at most ``window`` unanswered, wait in order, report each answer."""
    results: list[GenerationResult] = []
    in_flight: deque[GenerationRequest] = deque()

    def wait_oldest() -> None:
        oldest = in_flight.popleft()
        result = queue.wait_result(oldest.id, timeout_s)
        results.append(result or _timed_out(oldest, timeout_s))
        report(len(results))

    for request in requests:
        if len(in_flight) >= window:
            wait_oldest()
        request.enqueued_at = now()
        queue.submit(request)
        in_flight.append(request)
    while in_flight:
        wait_oldest()
    return results


def run_batch(
    redis_url: str,
    key_prefix: str,
    requests: list[str],
    request_timeout_s: float,
    window: int = 32,
) -> list[dict[str, object]]:
    """The RQ job: answer serialised :class:`GenerationRequest` s; results as dicts."""
    parsed = [load(GenerationRequest, raw) for raw in requests]
    report = _progress_reporter(len(parsed))
    report(0)
    client = redis.Redis.from_url(redis_url)
    try:
        queue = WorkerQueue(client, Keys(key_prefix), JOBS_CONSUMER)
        results = run_requests(queue, parsed, request_timeout_s, window, report)
    finally:
        client.close()
    log.info("batch of %d request(s) answered", len(results))
    return [result.model_dump() for result in results]
