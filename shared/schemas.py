"""Messages that cross a process boundary (Redis, database), as pydantic models.

Serialisation is confined to :func:`dump` and :func:`load`; nothing else on the wire
is a loose dict.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["fp32", "bf16", "fp16", "int8"]
FinishReason = Literal["stop", "length", "error", "cancelled"]
RequestKind = Literal["completion", "chat"]

M = TypeVar("M", bound=BaseModel)


def now() -> float:
    """Wall-clock seconds since the epoch: the one clock used in every record."""
    return time.time()


def dump(message: BaseModel) -> str:
    """Serialise a message for Redis or a database column."""
    return message.model_dump_json()


def load(model: type[M], raw: str | bytes) -> M:
    """Parse a message written by :func:`dump`; raises ``pydantic.ValidationError``."""
    return model.model_validate_json(raw)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class SamplingParams(_Wire):
    """How to generate: validated by the gateway, applied per request by the engine."""

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0 means greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    # Generate exactly max_tokens (benchmarks on random weights, where EOS is noise).
    ignore_eos: bool = False


class GenerationRequest(_Wire):
    """One sequence to generate, as queued on the requests stream."""

    id: str
    kind: RequestKind = "completion"
    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False
    enqueued_at: float = Field(default_factory=now)
    job_id: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class TokenDelta(_Wire):
    """Streamed text of one request: ``text`` starts at character ``offset``."""

    type: Literal["delta"] = "delta"
    request_id: str
    offset: int
    text: str


class GenerationResult(_Wire):
    """The final answer to one request, published once."""

    type: Literal["result"] = "result"
    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str
    worker_id: str
    queued_at: float
    started_at: float
    first_token_at: float | None = None
    finished_at: float = Field(default_factory=now)
    # Set when the engine capped the request (max sequence length) or failed it.
    note: str | None = None
    error: str | None = None


class ModelInfo(_Wire):
    """What a worker serves; published so the gateway can validate without torch."""

    name: str
    requested: str
    synthetic: bool
    context_length: int
    tokenizer_json: str
    chat_template: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"


class ControlSettings(_Wire):
    """Settings the agent decides and a worker applies at its next batch boundary."""

    version: int = 0
    # Max concurrent sequences of the engine core (the seed's "batch size").
    batch_size: int = Field(default=16, ge=1)
    max_seq_len: int = Field(default=2048, ge=16)
    precision: Precision = "bf16"
    # Tokens one engine step may compute (prefill chunks + decodes); 0: the worker's default.
    max_batched_tokens: int = Field(default=0, ge=0)
    # Bytes of the paged KV pool; 0: all the memory the device can spare.
    kv_budget_bytes: int = Field(default=0, ge=0)
    reason: str = "initial settings"
    updated_at: float = Field(default_factory=now)


def gpu_uuid_key(uuid: str) -> str:
    """A GPU's UUID as NVML (``GPU-8f3e0000-aaaa-...``) and torch (``8f3e0000-aaaa-...``)
    both give it: its hex digits, lower case."""
    text = uuid.strip().lower()
    text = text[4:] if text.startswith("gpu-") else text
    return text.replace("-", "")


class GpuSample(_Wire):
    """NVML reading of one GPU."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    # Memory of processes on this GPU by pid, where NVML can tell.
    process_memory_bytes: dict[int, int] = Field(default_factory=dict)
    # NVML's UUID (see gpu_uuid_key): a worker that sees only its own GPU (a container,
    # CUDA_VISIBLE_DEVICES) calls it cuda:0 whatever its index here.
    uuid: str | None = None


class TelemetrySample(_Wire):
    """One monitor reading: every GPU (empty with ``gpu='none'``) plus the host."""

    type: Literal["telemetry"] = "telemetry"
    ts: float = Field(default_factory=now)
    host: str
    gpu: Literal["nvml", "none"]
    gpus: list[GpuSample] = Field(default_factory=list)
    host_memory_used_bytes: int = 0
    host_memory_total_bytes: int = 0
    cpu_pct: float = 0.0
    note: str | None = None


class CycleStats(_Wire):
    """One inference cycle (a batch) of a worker: recorded and sent to the agent."""

    type: Literal["cycle"] = "cycle"
    ts: float = Field(default_factory=now)
    worker_id: str
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    settings_version: int
    settings_reason: str = ""
    batch_size: int
    max_prompt_len: int
    mean_prompt_len: float
    max_new_tokens: int
    precision: Precision
    max_seq_len: int
    tokens_generated: int
    tokens_per_s: float
    latency_s: float
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    padding_ratio: float
    memory_allocated_bytes: int | None = None
    memory_peak_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    nvml_total_bytes: int | None = None
    gpu_utilization_pct: float | None = None
    queue_depth: int = 0
    oom_events: int = 0
    # Memory freed (negative: taken) by a precision change applied before this cycle.
    precision_saved_bytes: int | None = None
    # Engine-core figures of the window of steps this record covers (continuous
    # batching: ``batch_size`` is the most sequences running at once in the window).
    steps: int = 1
    requests_finished: int = 0
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_usage: float = 0.0
    kv_pool_bytes: int = 0
    preemptions: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    step_time_mean_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    itl_p50_s: float | None = None
    itl_p95_s: float | None = None
    max_batched_tokens: int = 0


class OomEvent(_Wire):
    """A CUDA out-of-memory caught by the worker's guard."""

    type: Literal["oom"] = "oom"
    ts: float = Field(default_factory=now)
    worker_id: str
    gpu_index: int | None = None
    batch_size: int
    max_prompt_len: int
    max_new_tokens: int
    precision: Precision
    settings_version: int
    recovered: bool
    action: str
    message: str = ""


class DecisionAction(StrEnum):
    GROW = "grow"
    SHRINK = "shrink"
    HOLD = "hold"
    HALVE = "halve"
    PRECISION = "precision"
    CAP_SEQ = "cap_seq"
    RELAX_SEQ = "relax_seq"
    KV_BUDGET = "kv_budget"
    TTFT = "ttft"  # the step token budget moved for the time-to-first-token target


class Decision(_Wire):
    """A change of settings by the agent, with the inputs that led to it."""

    ts: float = Field(default_factory=now)
    worker_id: str
    action: DecisionAction
    reason: str
    before: ControlSettings
    after: ControlSettings
    inputs: dict[str, float | int | str | None] = Field(default_factory=dict)


class RequestRecord(_Wire):
    """Timings of one request, recorded by the worker that answered it."""

    request_id: str
    worker_id: str
    kind: RequestKind
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    queued_at: float
    started_at: float
    first_token_at: float | None
    finished_at: float
    settings_version: int


WorkerEvent = CycleStats | OomEvent


class WorkerInfo(_Wire):
    """A worker as it announces itself at start-up (recorded, shown on the dashboard)."""

    worker_id: str
    host: str
    pid: int
    device: str
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    gpu_name: str | None = None
    model: str
    synthetic: bool
    context_length: int | None = None
    started_at: float = Field(default_factory=now)


class DeadLetter(_Wire):
    """A request given up after failing ``deliveries`` times; its client got ``error``."""

    type: Literal["dead_letter"] = "dead_letter"
    ts: float = Field(default_factory=now)
    request_id: str
    entry_id: str
    deliveries: int
    error: str
    worker_id: str
    model: str
    prompt_tokens: int
    # The start of the prompt only: a capped stream must stay small.
    prompt_preview: str
    params: SamplingParams


class IdempotencyRecord(_Wire):
    """What an ``Idempotency-Key`` stands for: the first run of a body, then its answers.

    A retry with the same key is answered from the requests named here (and, once
    they are done, from ``results``) instead of running the body again.
    """

    body_digest: str
    response_id: str
    created: int
    model_name: str
    synthetic: bool
    prompt_tokens: int
    include_usage: bool = False
    request_ids: list[str]
    enqueued_at: float = Field(default_factory=now)
    results: list[GenerationResult] | None = None
