"""OpenAI-compatible request and response bodies of the HTTP API.

Requests ignore unknown fields (clients send many we don't use); bounds that depend on
settings or on the served model are checked in :mod:`services.gateway.planning`.
Responses carry a non-standard ``aegis`` field (worker and timings) that OpenAI clients
tolerate.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    # Extension (as in vLLM): generate exactly max_tokens, never stopping at EOS.
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a prompt, or a list of prompts (one choice each)."""

    prompt: str | list[str]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text: its string, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: a conversation to continue as the assistant."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AegisResult(BaseModel):
    """Where and how fast one choice was generated."""

    request_id: str
    worker_id: str
    queue_wait_s: float
    time_to_first_token_s: float | None
    generation_s: float
    note: str | None = None


class AegisInfo(BaseModel):
    synthetic: bool
    results: list[AegisResult]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    aegis: AegisInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    aegis: AegisInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aegis"
    synthetic: bool
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class JobRequest(_Body):
    """``POST /v1/jobs``: several completion bodies (``stream`` is not allowed)."""

    requests: list[CompletionRequest] = Field(min_length=1)


class JobProgress(BaseModel):
    done: int
    total: int


class JobCreated(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    created: int


JobState = Literal["queued", "started", "finished", "failed"]


class JobStatus(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobState
    created: int | None
    progress: JobProgress
    results: list[CompletionResponse] | None = None
    error: str | None = None


def dump_json(model: BaseModel) -> dict[str, Any]:
    """A response body without ``None`` extras that OpenAI omits (``aegis``, ``usage``)."""
    body = model.model_dump()
    for name in ("aegis", "usage"):
        if body.get(name) is None:
            body.pop(name, None)
    return body
