"""Settings of the gateway process, read from ``AEGIS_*`` environment variables."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from shared.config import CommonSettings


def _comma_list(value: object) -> object:
    """``a,b`` from the environment as a list (blank items dropped)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# ``gateway_processes=0``: one process per CPU core, at most this many.
AUTO_PROCESSES_MAX = 8


class GatewaySettings(CommonSettings):
    """Where the gateway listens and the bounds it enforces at the edge."""

    # Loopback only by default: set 0.0.0.0 (and API keys) to serve other hosts.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    # Server processes sharing the port (each its own event loop; the kernel spreads new
    # connections over them). 1: one process, no supervisor. 0: one per CPU core, at
    # most AUTO_PROCESSES_MAX. See services/gateway/processes.py.
    gateway_processes: int = Field(default=1, ge=0, le=64)
    # Admission bound, in sequences: waiting in the stream plus held by workers. A body
    # whose sequences don't all fit is refused whole with 429.
    max_queue_depth: int = Field(default=1024, ge=1)
    # Redis connections a server process sends commands on (admission, cancels...); a
    # command beyond them waits for one. Answers are read on connections of their own,
    # one per 256 waiting requests (shared/feed.py).
    gateway_redis_connections: int = Field(default=32, ge=1, le=1024)
    # How long a request may wait for its answer before the client gets a 504.
    request_timeout_s: float = Field(default=300.0, gt=0)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_n: int = Field(default=8, ge=1, le=128)
    # A completion's ``prompt`` may be a list; each item is a separate sequence.
    max_prompts: int = Field(default=64, ge=1)
    max_stop: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=256, ge=1)
    # Refused before tokenizing, so a huge body can't hold the event loop for long.
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    # Refused with 413 before the body is parsed.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # How often the published model is checked for a change (cheap: a hash, not the JSON).
    model_refresh_s: float = Field(default=5.0, gt=0)
    # With strict names, a ``model`` that is not the served one (or an alias) is a 404.
    strict_model_names: bool = False
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Bearer keys for /v1/* (comma-separated); none means no authentication.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Whether /health, /ready and /metrics need a key too (when keys are set).
    auth_operations: bool = False
    # How long a retry with the same Idempotency-Key is answered from the first run.
    idempotency_ttl_s: int = Field(default=3600, ge=1)
    # On SIGTERM: requests still waiting after drain_s get a 503 (OpenAI shape), and the
    # server closes what is left at shutdown_grace_s.
    shutdown_grace_s: float = Field(default=10.0, gt=0)
    drain_s: float = Field(default=8.0, gt=0)
    # Batch jobs: the RQ job's time limit and how many of its requests are queued at once.
    job_timeout_s: int = Field(default=3600, ge=1)
    job_window: int = Field(default=32, ge=1)
    job_result_ttl_s: int = Field(default=86400, ge=1)
    max_job_requests: int = Field(default=1000, ge=1)
    # Seconds a client is told to wait after a 429.
    retry_after_s: int = Field(default=1, ge=0)

    _split_lists = field_validator("model_aliases", "api_keys", mode="before")(_comma_list)

    def resolved_gateway_processes(self) -> int:
        """How many server processes to run: ``gateway_processes``, 0 resolved."""
        if self.gateway_processes:
            return self.gateway_processes
        # The cores this process may run on (a CPU set or affinity), not the host's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, min(cores or os.cpu_count() or 1, AUTO_PROCESSES_MAX))

    @model_validator(mode="after")
    def _drain_before_grace(self) -> GatewaySettings:
        if self.drain_s >= self.shutdown_grace_s:
            raise ValueError("drain_s must be shorter than shutdown_grace_s")
        return self
