"""Asynchronous batch jobs, run by RQ workers."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus

from services.gateway.catalog import ServedModel
from services.gateway.config import GatewaySettings
from services.gateway.deps import ModelDep, StateDep
from services.gateway.errors import ApiError, bad_request
from services.gateway.jobs import run_batch
from services.gateway.openapi import EDGE, errors
from services.gateway.planning import Plan, plan_completion
from services.gateway.responses import completion_response
from services.gateway.schemas import (
    CompletionRequest,
    CompletionResponse,
    JobCreated,
    JobProgress,
    JobRequest,
    JobState,
    JobStatus,
)
from services.gateway.state import GatewayState
from shared.schemas import GenerationResult, dump

router = APIRouter(prefix="/v1", tags=["jobs"])

# The body is read by hand (a job of many bodies, or one body): documented here.
_COMPLETION = {"$ref": "#/components/schemas/CompletionRequest"}
_JOB_BODY = {
    "type": "object",
    "required": ["requests"],
    "properties": {"requests": {"type": "array", "minItems": 1, "items": _COMPLETION}},
}

_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")

_STATUS: dict[RqStatus, JobState] = {
    RqStatus.QUEUED: "queued",
    RqStatus.DEFERRED: "queued",
    RqStatus.SCHEDULED: "queued",
    RqStatus.STARTED: "started",
    RqStatus.FINISHED: "finished",
}


async def _bodies(request: Request, settings: GatewaySettings) -> list[CompletionRequest]:
    """``{"requests": [...]}`` or one completion body; 400 on anything else."""
    try:
        raw = json.loads(await request.body())
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc
    try:
        if isinstance(raw, dict) and "requests" in raw:
            bodies = JobRequest.model_validate(raw).requests
        else:
            bodies = [CompletionRequest.model_validate(raw)]
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    if len(bodies) > settings.max_job_requests:
        raise bad_request(
            f"a job may hold at most {settings.max_job_requests} requests", "requests"
        )
    return bodies


def _plans(
    bodies: list[CompletionRequest], model: ServedModel, settings: GatewaySettings
) -> list[Plan]:
    plans = []
    for index, body in enumerate(bodies):
        if body.stream:
            raise bad_request(f"requests[{index}]: stream is not supported in a job", "stream")
        try:
            plans.append(plan_completion(body, model, settings))
        except ApiError as exc:
            exc.message = f"requests[{index}]: {exc.message}"
            raise
    return plans


def _enqueue(state: GatewayState, plans: list[Plan], created: int) -> str:
    requests = [request for plan in plans for request in plan.requests]
    groups = [
        {"id": p.response_id, "prompt_tokens": p.prompt_tokens, "count": len(p.requests)}
        for p in plans
    ]
    meta = {
        "created": created,
        "model": plans[0].model_name,
        "synthetic": plans[0].synthetic,
        "groups": groups,
        "progress": {"done": 0, "total": len(requests)},
    }
    job = state.jobs.enqueue_call(
        run_batch,
        kwargs={
            "redis_url": state.settings.redis_url,
            "key_prefix": state.settings.key_prefix,
            "requests": [dump(request) for request in requests],
            "request_timeout_s": state.settings.request_timeout_s,
            "window": state.settings.job_window,
        },
        timeout=state.settings.job_timeout_s,
        result_ttl=state.settings.job_result_ttl_s,
        failure_ttl=state.settings.job_result_ttl_s,
        job_id=f"job-{uuid.uuid4().hex}",
        meta=meta,
    )
    return str(job.id)


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobCreated,
    responses=errors(*EDGE),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"anyOf": [_JOB_BODY, _COMPLETION]}}},
        }
    },
)
async def create_job(request: Request, state: StateDep, model: ModelDep) -> JSONResponse:
    """Queue a batch of completion requests; answers 202 with the job's id."""
    bodies = await _bodies(request, state.settings)
    plans = _plans(bodies, model, state.settings)
    created = int(time.time())
    job_id = await run_in_threadpool(_enqueue, state, plans, created)
    body = JobCreated(id=job_id, status="queued", created=created)
    return JSONResponse(body.model_dump(), status_code=202)


def _results(job: Job, meta: dict[str, Any]) -> list[CompletionResponse]:
    """The job's results grouped back into one completion response per request body."""
    results = [GenerationResult.model_validate(raw) for raw in job.return_value() or []]
    responses, start = [], 0
    for group in meta.get("groups", []):
        chunk = results[start : start + group["count"]]
        start += group["count"]
        responses.append(
            completion_response(
                group["id"],
                meta["created"],
                meta["model"],
                meta["synthetic"],
                group["prompt_tokens"],
                chunk,
            )
        )
    return responses


def _describe(job: Job) -> JobStatus:
    meta = job.get_meta(refresh=True)
    status: JobState = _STATUS.get(job.get_status(refresh=False), "failed")
    progress = meta.get("progress", {"done": 0, "total": 0})
    body = JobStatus(
        id=str(job.id),
        status=status,
        created=meta.get("created"),
        progress=JobProgress(**progress),
    )
    if status == "finished":
        body.results = _results(job, meta)
    elif status == "failed":
        body.error = _failure(job)
    return body


def _failure(job: Job) -> str:
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or "the job failed"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"


def _fetch(state: GatewayState, job_id: str) -> JobStatus | None:
    try:
        job = Job.fetch(job_id, connection=state.sync_client)
    except NoSuchJobError:
        return None
    # Another deployment's job (other prefix) is not ours to show.
    if job.origin != state.keys.rq_queue:
        return None
    return _describe(job)


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=errors(*EDGE, 404))
async def get_job(job_id: str, state: StateDep) -> JSONResponse:
    """A job's status, progress, and its results once finished."""
    # RQ refuses (ValueError) ids it could never have made: those are simply unknown.
    known = _JOB_ID.fullmatch(job_id) is not None
    body = await run_in_threadpool(_fetch, state, job_id) if known else None
    if body is None:
        raise ApiError(404, f"no job {job_id!r}", "not_found_error", "job_id", "job_not_found")
    return JSONResponse(body.model_dump(exclude_none=False))
