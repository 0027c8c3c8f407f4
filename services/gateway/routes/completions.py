"""OpenAI-compatible text and chat completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import GeneratorDep, ModelDep, SettingsDep
from services.gateway.planning import plan_chat, plan_completion
from services.gateway.responses import (
    ChatChunks,
    CompletionChunks,
    chat_response,
    completion_response,
    event_stream,
)
from services.gateway.schemas import ChatRequest, CompletionRequest, dump_json

router = APIRouter(prefix="/v1", tags=["generation"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, model: ModelDep, settings: SettingsDep, generator: GeneratorDep
) -> JSONResponse | StreamingResponse:
    """Complete a prompt (or a list of prompts); streams server-sent events if asked."""
    plan = plan_completion(body, model, settings)
    await generator.submit(plan.requests)
    if body.stream:
        return StreamingResponse(
            event_stream(plan, generator, CompletionChunks()),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results = await generator.collect(plan.requests)
    response = completion_response(
        plan.response_id, plan.created, plan.model_name, plan.synthetic, plan.prompt_tokens, results
    )
    return JSONResponse(dump_json(response))


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatRequest, model: ModelDep, settings: SettingsDep, generator: GeneratorDep
) -> JSONResponse | StreamingResponse:
    """Continue a conversation as the assistant; streams server-sent events if asked."""
    plan = plan_chat(body, model, settings)
    await generator.submit(plan.requests)
    if body.stream:
        return StreamingResponse(
            event_stream(plan, generator, ChatChunks()),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results = await generator.collect(plan.requests)
    return JSONResponse(dump_json(chat_response(plan, results)))
