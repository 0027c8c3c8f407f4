"""OpenAI-compatible text and chat completions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from services.gateway.deps import ServingDep
from services.gateway.generation import Generator
from services.gateway.idempotency import (
    IdempotencyHeader,
    body_digest,
    first_run,
    new_record,
    scoped_key,
)
from services.gateway.openapi import GENERATION
from services.gateway.planning import Plan, plan_chat, plan_completion
from services.gateway.responses import (
    ChatChunks,
    ChunkFormat,
    CompletionChunks,
    Results,
    chat_response,
    completion_response,
    event_stream,
    replay,
)
from services.gateway.schemas import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    dump_json,
)
from shared.schemas import IdempotencyRecord

router = APIRouter(prefix="/v1", tags=["generation"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# One server-sent event (OpenAPI before 3.2: a text/event-stream ``schema`` describes
# each event): its ``data`` is a JSON chunk, then ``[DONE]``.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"}},
    "required": ["data"],
}
Respond = Callable[[Plan, Results], BaseModel]


def _documented(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    ok = {
        "model": model,
        "description": "The answer, or server-sent events of chunks when `stream` is true",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
    return {200: ok, **GENERATION}


@router.post("/completions", response_model=None, responses=_documented(CompletionResponse))
async def create_completion(
    body: CompletionRequest,
    request: Request,
    serving: ServingDep,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse | StreamingResponse:
    """Complete a prompt (or a list of prompts); streams server-sent events if asked."""
    plan = plan_completion(body, serving.model, serving.settings)

    def respond(plan: Plan, results: Results) -> BaseModel:
        return completion_response(
            plan.response_id, plan.created, plan.model_name, plan.synthetic,
            plan.prompt_tokens, results,
        )  # fmt: skip

    call = _Call(plan, body, request, idempotency_key)
    return await call.answer(serving.generator, CompletionChunks(), respond)


@router.post("/chat/completions", response_model=None, responses=_documented(ChatResponse))
async def create_chat_completion(
    body: ChatRequest,
    request: Request,
    serving: ServingDep,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse | StreamingResponse:
    """Continue a conversation as the assistant; streams server-sent events if asked."""
    plan = plan_chat(body, serving.model, serving.settings)
    call = _Call(plan, body, request, idempotency_key)
    return await call.answer(serving.generator, ChatChunks(), chat_response)


@dataclass
class _Call:
    """One generation body on its way: queued (or matched to its first run), answered."""

    plan: Plan
    body: SamplingFields
    request: Request
    idempotency_key: str | None

    async def answer(
        self, generator: Generator, chunks: ChunkFormat, respond: Respond
    ) -> JSONResponse | StreamingResponse:
        """Queue the plan's requests, then stream their events or wait for every answer."""
        key, record, replayed = await self._admit(generator)
        kept = key is not None
        stored = record.results if record is not None else None
        headers = {"Idempotent-Replayed": "true"} if replayed else {}

        async def save(results: Results) -> None:
            if key is not None and record is not None and stored is None:
                await generator.queue.save_results(key, record, results)

        if self.body.stream:
            events = replay(stored) if stored else generator.stream(self.plan.requests, kept)
            return StreamingResponse(
                event_stream(self.plan, events, chunks, save), media_type="text/event-stream",
                headers=SSE_HEADERS | headers,
            )  # fmt: skip
        results = stored or await generator.collect(self.plan.requests, self._left, kept)
        await save(results)
        return JSONResponse(dump_json(respond(self.plan, results)), headers=headers)

    async def _admit(
        self, generator: Generator
    ) -> tuple[str | None, IdempotencyRecord | None, bool]:
        """Queue the requests; with a known Idempotency-Key, switch to its first run."""
        if self.idempotency_key is None:
            await generator.submit(self.plan.requests)
            return None, None, False
        key = scoped_key(self.request, self.idempotency_key)
        digest = body_digest(self.request, self.body)
        record = new_record(self.plan, digest)
        admitted = await generator.submit(self.plan.requests, key, record)
        if admitted.record is None:
            return key, record, False
        self.plan = first_run(admitted.record, digest)
        return key, admitted.record, True

    async def _left(self) -> None:
        """Returns when the client disconnects (the body was read: nothing else comes)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
