"""Pieces every scenario uses: AEGIS's engine and settings, the policy, the memory prior."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from experiments import workloads
from experiments.context import BenchContext
from experiments.runner import AegisRunner, ClosedLoop
from services.agent.memory_model import Coefficients
from services.agent.policy import PolicyConfig
from services.worker.core.engine import EngineCore
from services.worker.model import LoadedModel, parameter_bytes
from services.worker.oom import OomInjector
from services.worker.precision import free_memory
from shared.schemas import ControlSettings

BF16_BYTES = 2

log = logging.getLogger(__name__)


def runner(ctx: BenchContext, fault: OomInjector | None = None) -> AegisRunner:
    """AEGIS's engine core on the shared model, empty, at the run's precision.

    (A policy may have changed the precision in an earlier run; every run starts equal:
    each run's settings carry the run's precision and the core applies them first.)
    """
    core = ctx.core()
    core.fault = fault
    core.apply(settings(ctx, core.limits.max_num_seqs))
    free_memory()
    return AegisRunner(core, ctx.device)


def idle_card_pool(core: EngineCore) -> int | None:
    """The KV pool a worker alone on this card starts with and the agent keeps (within
    its 10 % resize threshold): the room left by weights, activations and other processes,
    less 10 % of the card. None off CUDA."""
    room = core.runner.room_for_kv_bytes()
    if room is None:
        return None
    import torch

    total = int(torch.cuda.get_device_properties(core.device).total_memory)
    return room - total // 10


def settings(ctx: BenchContext, batch: int) -> ControlSettings:
    """Static settings: ``batch`` concurrent sequences, full context, the run's precision."""
    return ControlSettings(
        batch_size=batch,
        max_seq_len=ctx.model().context_length,
        precision=ctx.precision,
        max_batched_tokens=ctx.max_batched_tokens,
        kv_budget_bytes=ctx.kv_budget_bytes,
        reason="benchmark settings",
        updated_at=0.0,
    )


def policy_config(ctx: BenchContext) -> PolicyConfig:
    """The agent's default thresholds, with the scale's overrides (workloads.json)."""
    context = ctx.model().context_length
    base = {"max_seq_len": context, "min_seq_len": min(128, context)}
    overrides = workloads.policy_overrides(ctx.scale)
    return dataclasses.replace(PolicyConfig(), **{**base, **overrides})


def closed_loop(ctx: BenchContext, start_batch: int) -> ClosedLoop:
    """AEGIS adaptive: the policy starts from static settings at ``start_batch``."""
    return ClosedLoop.start(
        settings(ctx, start_batch), policy_config(ctx), architecture_prior(ctx.model())
    )


def architecture_prior(loaded: LoadedModel) -> Coefficients:
    """The memory model's prior from the model's shapes, in bf16 bytes.

    Weights; K and V of every layer per token; logits of one position at fp32 (twice)
    per row. For TinyLlama this is ARCHITECTURE.md's 2.2 GB / 22,528 B / 256,000 B.
    """
    cfg = loaded.model.config
    params = parameter_bytes(loaded.model) / next(loaded.model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * BF16_BYTES
    return Coefficients(params * BF16_BYTES, float(per_token), float(cfg.vocab_size * 4 * 2))


def attempt(what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one peer's measurement; a failure is recorded (``{"error": ...}``), never the
    end of the scenario (a compile error must not lose the AEGIS figures beside it)."""
    try:
        return run()
    except Exception as exc:
        log.exception("%s failed", what)
        free_memory()
        return {"error": f"{type(exc).__name__}: {exc}"}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def policy_dict(ctx: BenchContext) -> dict[str, Any]:
    return dataclasses.asdict(policy_config(ctx))
