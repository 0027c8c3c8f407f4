"""OpenAI-compatible request and response bodies of the HTTP API.

Requests ignore unknown fields (clients send many we don't use), but every field they
declare is range-checked here, including those AEGIS refuses when set (penalties,
logprobs: see :mod:`services.gateway.planning`), and every string must be valid Unicode
(a lone surrogate such as ``"\ud800"`` can't be tokenized). Bounds that depend on
settings or on the served model are checked in planning. Responses carry a non-standard
``aegis`` field (worker and timings) that OpenAI clients tolerate.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.schemas import DeadLetter

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


def _valid_unicode(text: str) -> str:
    """Refuse lone surrogates (valid JSON escapes, but not text a tokenizer can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate at character {exc.start}: not valid Unicode text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: Text | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: Text | list[Text] | None = None
    # The engine's generators take a signed 64-bit seed.
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    # Range-checked as OpenAI does; any value other than 0 is refused (not applied).
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Extension (as in vLLM): generate exactly max_tokens, never stopping at EOS.
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=256)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a prompt, or a list of prompts (one choice each)."""

    prompt: Text | list[Text]
    # Refused when set (AEGIS returns no logprobs, no echo, no suffix, no best_of > n).
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: Text | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(default=None, max_length=256)

    def text(self) -> str:
        """The message's text: its string, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: a conversation to continue as the assistant."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # Refused when asked for: AEGIS returns no logprobs.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the gateway answers, in OpenAI's shape."""

    error: ErrorDetail


class DeadLetterList(BaseModel):
    """The newest dead letters (the stream keeps the last 1,000) and the count ever."""

    object: Literal["list"] = "list"
    data: list[DeadLetter]
    total: int


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
