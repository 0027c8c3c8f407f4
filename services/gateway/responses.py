"""OpenAI response bodies and server-sent event streams built from results."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

from services.gateway.errors import ApiError, error_body
from services.gateway.generation import Event, unanswered
from services.gateway.planning import Plan
from services.gateway.schemas import (
    AegisInfo,
    AegisResult,
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Usage,
    dump_json,
)
from shared.schemas import GenerationResult, TokenDelta

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, results: list[GenerationResult]) -> Usage:
    completion = sum(result.completion_tokens for result in results)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def aegis_info(synthetic: bool, results: list[GenerationResult]) -> AegisInfo:
    """Worker and timings of each choice (a non-standard field clients ignore)."""
    return AegisInfo(
        synthetic=synthetic,
        results=[
            AegisResult(
                request_id=r.request_id,
                worker_id=r.worker_id,
                queue_wait_s=round(max(0.0, r.started_at - r.queued_at), 6),
                time_to_first_token_s=None
                if r.first_token_at is None
                else round(max(0.0, r.first_token_at - r.queued_at), 6),
                generation_s=round(max(0.0, r.finished_at - r.started_at), 6),
                note=r.note,
            )
            for r in results
        ],
    )


def completion_response(
    response_id: str,
    created: int,
    model: str,
    synthetic: bool,
    prompt_tokens: int,
    results: list[GenerationResult],
) -> CompletionResponse:
    """The ``text_completion`` body of a list of results (choice ``i`` is result ``i``)."""
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=usage(prompt_tokens, results),
        aegis=aegis_info(synthetic, results),
    )


def chat_response(plan: Plan, results: list[GenerationResult]) -> ChatResponse:
    return ChatResponse(
        id=plan.response_id,
        created=plan.created,
        model=plan.model_name,
        choices=[
            ChatChoice(
                index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason
            )
            for i, r in enumerate(results)
        ],
        usage=usage(plan.prompt_tokens, results),
        aegis=aegis_info(plan.synthetic, results),
    )


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class ChunkFormat(Protocol):
    """How one endpoint writes its stream chunks."""

    def opening(self, plan: Plan) -> list[dict[str, Any]]: ...

    def piece(self, plan: Plan, index: int, text: str, finish: str | None) -> dict[str, Any]: ...

    def usage(self, plan: Plan, usage: Usage) -> dict[str, Any]: ...


class CompletionChunks:
    """``text_completion`` chunks."""

    def opening(self, plan: Plan) -> list[dict[str, Any]]:
        return []

    def piece(self, plan: Plan, index: int, text: str, finish: str | None) -> dict[str, Any]:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish)
        return dump_json(self._chunk(plan, [choice]))

    def usage(self, plan: Plan, usage: Usage) -> dict[str, Any]:
        return dump_json(self._chunk(plan, [], usage))

    @staticmethod
    def _chunk(
        plan: Plan, choices: list[CompletionChoice], use: Usage | None = None
    ) -> CompletionChunk:
        return CompletionChunk(
            id=plan.response_id,
            created=plan.created,
            model=plan.model_name,
            choices=choices,
            usage=use,
        )


class ChatChunks:
    """``chat.completion.chunk`` chunks; each choice opens with ``delta.role``."""

    def opening(self, plan: Plan) -> list[dict[str, Any]]:
        return [
            self._dump(
                plan, [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]
            )
            for i in range(len(plan.requests))
        ]

    def piece(self, plan: Plan, index: int, text: str, finish: str | None) -> dict[str, Any]:
        delta = ChatDelta(content=text) if text else ChatDelta()
        return self._dump(plan, [ChatChunkChoice(index=index, delta=delta, finish_reason=finish)])

    def usage(self, plan: Plan, usage: Usage) -> dict[str, Any]:
        return self._dump(plan, [], usage)

    @staticmethod
    def _dump(
        plan: Plan, choices: list[ChatChunkChoice], use: Usage | None = None
    ) -> dict[str, Any]:
        chunk = ChatChunk(
            id=plan.response_id,
            created=plan.created,
            model=plan.model_name,
            choices=choices,
            usage=use,
        )
        body = dump_json(chunk)
        for choice in body["choices"]:
            # OpenAI sends only the delta's fields that are set ({} at the end).
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return body


Results = list[GenerationResult]


async def replay(results: Results) -> AsyncGenerator[tuple[int, Event]]:
    """Stored answers (an Idempotency-Key's first run) as the events of a stream."""
    for index, result in enumerate(results):
        yield index, result


async def event_stream(
    plan: Plan,
    events: AsyncGenerator[tuple[int, Event]],
    fmt: ChunkFormat,
    on_complete: Callable[[Results], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed request: chunks, usage if asked, then ``[DONE]``.

    An error once the stream has begun can't change the status: it is sent as an
    ``{"error": ...}`` event (which the OpenAI client raises), then ``[DONE]``. A client
    that goes away cancels this generator, which closes ``events`` (and so cancels the
    work, see :meth:`Generator.stream`). ``on_complete`` gets every answer, in choice
    order, once all are in.
    """
    sent = [0] * len(plan.requests)
    results: dict[int, GenerationResult] = {}
    try:
        for chunk in fmt.opening(plan):
            yield sse(chunk)
        async with aclosing(events):
            async for index, event in events:
                if isinstance(event, TokenDelta):
                    sent[index] = event.offset + len(event.text)
                    if event.text:
                        yield sse(fmt.piece(plan, index, event.text, None))
                    continue
                error = unanswered(event)
                if error is not None:
                    raise error
                results[index] = event
                # Text the worker did not stream (if any) goes out with the finish reason.
                yield sse(fmt.piece(plan, index, event.text[sent[index] :], event.finish_reason))
        ordered = [results[index] for index in sorted(results)]
        if on_complete is not None:
            await on_complete(ordered)
        if plan.include_usage:
            yield sse(fmt.usage(plan, usage(plan.prompt_tokens, ordered)))
    except ApiError as exc:
        yield sse(exc.body())
    except Exception as exc:
        log.exception("stream %s failed: %s", plan.response_id, exc)
        yield sse(error_body(f"stream failed: {exc}", "server_error"))
    yield DONE
