"""Settings of the agent service: every policy threshold, from ``AEGIS_*`` variables.

The policy fields carry the same names as :class:`services.agent.policy.PolicyConfig`
(``AEGIS_LOW_WATERMARK=0.5`` sets ``PolicyConfig.low_watermark``); inconsistent values
(low above high, min above max) fail at start-up.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import Field, model_validator

from services.agent.memory_model import Coefficients
from services.agent.policy import PolicyConfig
from shared.config import CommonSettings
from shared.schemas import ControlSettings, Precision


class AgentSettings(CommonSettings):
    """The agent's loop, the defaults it writes for new workers, and the policy."""

    # -- loop ------------------------------------------------------------------------------
    agent_poll_ms: int = Field(default=500, ge=10, le=60_000)  # XREAD block per loop
    telemetry_max_age_s: float = Field(default=10.0, gt=0)  # older samples are ignored
    worker_idle_s: float = Field(default=120.0, gt=0)  # no telemetry-only decisions after
    replay_events: bool = False  # read the streams from the start instead of from now
    # -- settings written for a worker that has none -----------------------------------------
    default_batch_size: int = Field(default=256, ge=1)
    default_max_seq_len: int = Field(default=2048, ge=16)
    default_precision: Precision = "bf16"
    # -- memory model prior (TinyLlama at bf16, ARCHITECTURE.md) ----------------------------
    prior_base_bytes: float = Field(default=2.2e9, ge=0)
    prior_per_token_bytes: float = Field(default=22_528.0, ge=0)
    prior_per_row_bytes: float = Field(default=256_000.0, ge=0)
    # -- policy (see PolicyConfig) ---------------------------------------------------------
    low_watermark: float = Field(default=0.60, gt=0, lt=1)
    high_watermark: float = Field(default=0.85, gt=0, lt=1)
    grow_target: float = Field(default=0.75, gt=0, lt=1)
    grow_factor: float = Field(default=2.0, gt=1)
    backlog_grow_factor: float = Field(default=4.0, ge=1)  # stride cap with a deep queue
    shrink_factor: float = Field(default=0.75, gt=0, lt=1)
    min_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=256, ge=1)
    min_seq_len: int = Field(default=128, ge=16)
    max_seq_len: int = Field(default=2048, ge=16)
    grow_cooldown_s: float = Field(default=10.0, ge=0)
    grow_cooldown_cycles: int = Field(default=3, ge=0)
    shrink_cooldown_s: float = Field(default=2.0, ge=0)
    shrink_cooldown_cycles: int = Field(default=1, ge=0)
    high_confirm_cycles: int = Field(default=2, ge=1)
    safety_margin: float = Field(default=0.05, ge=0, lt=1)
    oom_margin: float = Field(default=0.8, gt=0, le=1)
    overhead_bytes: int = Field(default=512 << 20, ge=0)
    neighbour_min_bytes: int = Field(default=256 << 20, ge=0)
    throughput_gain_min: float = Field(default=0.05, ge=0)
    plateau_hold_s: float = Field(default=300.0, ge=0)
    pressure_hold_s: float = Field(default=120.0, ge=0)
    grow_eval_timeout_s: float = Field(default=120.0, gt=0)
    full_batch_fraction: float = Field(default=0.9, gt=0, le=1)
    reduced_precision: Literal["bf16", "fp16"] = "bf16"
    allow_int8: bool = False
    long_seq_factor: float = Field(default=2.0, gt=1)
    long_seq_slowdown: float = Field(default=0.7, gt=0, lt=1)
    long_seq_cycles: int = Field(default=3, ge=1)
    seq_relax_s: float = Field(default=60.0, ge=0)
    window_cycles: int = Field(default=20, ge=2)
    kv_target_fraction: float = Field(default=0.90, gt=0, lt=1)
    kv_resize_min: float = Field(default=0.10, gt=0, lt=1)
    min_kv_bytes: int = Field(default=256 << 20, ge=0)
    ttft_target_ms: float | None = Field(default=None, gt=0)  # AEGIS_TTFT_TARGET_MS
    max_step_tokens: int = Field(default=16384, ge=16)
    ttft_queue_cycles: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        self.policy_config()  # raises ValueError with the reason
        return self

    def policy_config(self) -> PolicyConfig:
        """The policy's thresholds (same field names)."""
        return PolicyConfig(**{f.name: getattr(self, f.name) for f in fields(PolicyConfig)})

    def prior(self) -> Coefficients:
        """The memory model's starting point."""
        return Coefficients(
            self.prior_base_bytes, self.prior_per_token_bytes, self.prior_per_row_bytes
        )

    def default_settings(self) -> ControlSettings:
        """What a worker with no control hash gets (bounded by the policy's limits)."""
        return ControlSettings(
            batch_size=max(self.min_batch, min(self.max_batch, self.default_batch_size)),
            max_seq_len=max(self.min_seq_len, min(self.max_seq_len, self.default_max_seq_len)),
            precision=self.default_precision,
            reason="agent defaults",
        )
