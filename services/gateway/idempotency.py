"""``Idempotency-Key``: a client retry is answered from the first run, not run again.

The key is scoped by the caller's ``Authorization`` header (two API keys never share a
record) and stored with the first run's request ids in the admission script; a retry
with the same key and the same body waits on (or reads the stored answers of) that
run; the same key with another body is a 400. Records live ``AEGIS_IDEMPOTENCY_TTL_S``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Header, Request
from pydantic import BaseModel

from services.gateway.errors import bad_request
from services.gateway.planning import Plan
from shared.schemas import GenerationRequest, IdempotencyRecord

IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any printable ASCII string; a retry with the same key and body is "
        "answered from the first run instead of running again.",
    ),
]


def scoped_key(request: Request, key: str) -> str:
    """The record's name: the key, tied to the caller's credentials."""
    caller = request.headers.get("authorization", "")
    return hashlib.sha256(f"{caller}\n{key}".encode()).hexdigest()


def body_digest(request: Request, body: BaseModel) -> str:
    return hashlib.sha256(f"{request.url.path}\n{body.model_dump_json()}".encode()).hexdigest()


def new_record(plan: Plan, digest: str) -> IdempotencyRecord:
    return IdempotencyRecord(
        body_digest=digest,
        response_id=plan.response_id,
        created=plan.created,
        model_name=plan.model_name,
        synthetic=plan.synthetic,
        prompt_tokens=plan.prompt_tokens,
        include_usage=plan.include_usage,
        request_ids=[request.id for request in plan.requests],
    )


def first_run(record: IdempotencyRecord, digest: str) -> Plan:
    """The plan of the run a retry is answered from; 400 if the body is not the same."""
    if record.body_digest != digest:
        raise bad_request(
            "this Idempotency-Key was already used with a different request body",
            "Idempotency-Key",
            "idempotency_key_reused",
        )
    # Only ids and the enqueue time are read when waiting for answers.
    requests = [
        GenerationRequest(id=rid, prompt="", prompt_token_ids=[], enqueued_at=record.enqueued_at)
        for rid in record.request_ids
    ]
    return Plan(
        response_id=record.response_id,
        created=record.created,
        model_name=record.model_name,
        synthetic=record.synthetic,
        prompt_tokens=record.prompt_tokens,
        requests=requests,
        include_usage=record.include_usage,
    )
