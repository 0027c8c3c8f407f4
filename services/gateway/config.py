"""Settings of the gateway process, read from ``AEGIS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field

from shared.config import CommonSettings


class GatewaySettings(CommonSettings):
    """Where the gateway listens and the bounds it enforces at the edge."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    # Admission bound: requests are refused with 429 while the stream is this deep.
    max_queue_depth: int = Field(default=1024, ge=1)
    # How long a request may wait for its answer before the client gets a 504.
    request_timeout_s: float = Field(default=300.0, gt=0)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_n: int = Field(default=8, ge=1)
    # A completion's ``prompt`` may be a list; each item is a separate sequence.
    max_prompts: int = Field(default=64, ge=1)
    max_stop: int = Field(default=4, ge=0)
    # Refused before tokenizing, so a huge body can't hold the event loop for long.
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    # How often the published model is checked for a change (cheap: a hash, not the JSON).
    model_refresh_s: float = Field(default=5.0, gt=0)
    # Batch jobs: the RQ job's time limit and how many of its requests are queued at once.
    job_timeout_s: int = Field(default=3600, ge=1)
    job_window: int = Field(default=32, ge=1)
    job_result_ttl_s: int = Field(default=86400, ge=1)
    max_job_requests: int = Field(default=1000, ge=1)
    # Seconds a client is told to wait after a 429.
    retry_after_s: int = Field(default=1, ge=0)
