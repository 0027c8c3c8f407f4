"""OpenAI-compatible text and chat completions."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from services.gateway.deps import GeneratorDep, ModelDep, SettingsDep
from services.gateway.generation import Generator
from services.gateway.planning import Plan, plan_chat, plan_completion
from services.gateway.responses import (
    ChatChunks,
    ChunkFormat,
    CompletionChunks,
    chat_response,
    completion_response,
    event_stream,
)
from services.gateway.schemas import ChatRequest, CompletionRequest, dump_json
from shared.schemas import GenerationResult

router = APIRouter(prefix="/v1", tags=["generation"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, model: ModelDep, settings: SettingsDep, generator: GeneratorDep
) -> JSONResponse | StreamingResponse:
    """Complete a prompt (or a list of prompts); streams server-sent events if asked."""
    plan = plan_completion(body, model, settings)

    def respond(results: list[GenerationResult]) -> BaseModel:
        return completion_response(
            plan.response_id, plan.created, plan.model_name, plan.synthetic,
            plan.prompt_tokens, results,
        )  # fmt: skip

    return await _answer(plan, bool(body.stream), generator, CompletionChunks(), respond)


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatRequest, model: ModelDep, settings: SettingsDep, generator: GeneratorDep
) -> JSONResponse | StreamingResponse:
    """Continue a conversation as the assistant; streams server-sent events if asked."""
    plan = plan_chat(body, model, settings)

    def respond(results: list[GenerationResult]) -> BaseModel:
        return chat_response(plan, results)

    return await _answer(plan, bool(body.stream), generator, ChatChunks(), respond)


async def _answer(
    plan: Plan,
    stream: bool,
    generator: Generator,
    chunks: ChunkFormat,
    respond: Callable[[list[GenerationResult]], BaseModel],
) -> JSONResponse | StreamingResponse:
    """Queue the plan's requests, then stream their events or wait for every answer."""
    await generator.submit(plan.requests)
    if stream:
        return StreamingResponse(
            event_stream(plan, generator, chunks), media_type="text/event-stream",
            headers=SSE_HEADERS,
        )  # fmt: skip
    return JSONResponse(dump_json(respond(await generator.collect(plan.requests))))
