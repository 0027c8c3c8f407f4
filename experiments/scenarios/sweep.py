"""Sweep: tokens/s and peak memory vs batch size, AEGIS's engine vs the peers.

For each batch size ``b`` the first ``b x batches_per_point`` requests of the workload
(W1) run as static batches of ``b`` through AEGIS's engine and through HF ``generate``
eager. HF ``generate`` with a static cache (torch.compile on a GPU) runs at
``compile_batch_sizes`` after an untimed warm-up of the same shape (the compilation).
Continuous batching takes the whole workload at once and is compared with AEGIS's best
sweep batch size on the whole workload.
"""

from __future__ import annotations

import logging
from typing import Any

from experiments import peers
from experiments.context import BenchContext
from experiments.measure import RunResult
from experiments.scenarios.common import attempt, ratio, runner, settings
from shared.schemas import GenerationRequest

log = logging.getLogger(__name__)


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("sweep")
    requests = [r for _, reqs in ctx.requests(cfg["workload"]) for r in reqs]
    points = [_point(ctx, requests, b, cfg["batches_per_point"]) for b in cfg["batch_sizes"]]
    result: dict[str, Any] = {"workload": cfg["workload"], "config": cfg, "points": points}
    if ctx.wants("compile"):
        result["static_cache"] = [
            _compiled(ctx, requests, b, cfg["batches_per_point"])
            for b in cfg["compile_batch_sizes"]
        ]
    if ctx.wants("cb") and cfg.get("continuous_batching", True):
        result["continuous_batching"] = attempt(
            "continuous batching", lambda: _versus_cb(ctx, requests, points)
        )
    return result


def _subset(
    requests: list[GenerationRequest], batch: int, per_point: int
) -> list[GenerationRequest]:
    return requests[: batch * per_point]


def _point(
    ctx: BenchContext, requests: list[GenerationRequest], batch: int, per_point: int
) -> dict[str, Any]:
    subset = _subset(requests, batch, per_point)
    _warm_up(ctx, subset[:batch], batch)
    with ctx.bar(len(subset), f"sweep aegis b={batch}") as bar:
        aegis, _ = runner(ctx).run(subset, settings(ctx, batch), system="aegis", bar=bar)
    point: dict[str, Any] = {"batch_size": batch, "requests": len(subset), "aegis": aegis.to_dict()}
    if ctx.wants("eager"):
        with ctx.bar(len(subset), f"sweep eager b={batch}") as bar:
            eager = peers.hf_static(ctx.model(), subset, batch, "hf_eager", bar=bar)
        point["hf_eager"] = eager.to_dict()
        point["ratio_vs_eager"] = ratio(aegis.tokens_per_s, eager.tokens_per_s)
    return point


def _warm_up(ctx: BenchContext, batch_requests: list[GenerationRequest], batch: int) -> None:
    """Untimed: the first batch of a new shape pays kernel selection; whichever system ran
    first at a point would pay it. Same prompts, two new tokens, both systems."""
    short = [
        r.model_copy(update={"params": r.params.model_copy(update={"max_tokens": 2})})
        for r in batch_requests
    ]
    runner(ctx).run(short, settings(ctx, batch), system="warm-up")
    if ctx.wants("eager"):
        peers.hf_static(ctx.model(), short, batch, "warm-up")


def _compiled(
    ctx: BenchContext, requests: list[GenerationRequest], batch: int, per_point: int
) -> dict[str, Any]:
    subset = _subset(requests, batch, per_point)
    compiled = ctx.cuda or ctx.compile_on_cpu
    name = "hf_static_compile" if compiled else "hf_static_cache"
    loaded = ctx.model()
    # Warm-up on the same shape: on a GPU this is where torch.compile runs (not timed).
    peers.hf_static(
        loaded, subset[:batch], batch, name, static_cache=True, compile_ok=compiled, shape_of=subset
    )
    with ctx.bar(len(subset), f"sweep {name} b={batch}") as bar:
        timed_run = peers.hf_static(
            loaded, subset, batch, name, static_cache=True, compile_ok=compiled, bar=bar
        )
    timed_run.note = "" if compiled else "torch.compile skipped on CPU (static cache only)"
    timed_run.extra["compiled"] = compiled
    aegis, _ = runner(ctx).run(subset, settings(ctx, batch), system="aegis")
    return {
        "batch_size": batch,
        "requests": len(subset),
        "peer": timed_run.to_dict(),
        "aegis": aegis.to_dict(),
        "ratio": ratio(aegis.tokens_per_s, timed_run.tokens_per_s),
    }


def _versus_cb(
    ctx: BenchContext, requests: list[GenerationRequest], points: list[dict[str, Any]]
) -> dict[str, Any]:
    best = max(points, key=lambda p: p["aegis"]["tokens_per_s"])
    batch = int(best["batch_size"])
    if best["requests"] == len(requests):
        aegis = best["aegis"]
    else:
        with ctx.bar(len(requests), f"aegis b={batch} (all)") as bar:
            run_all, _ = runner(ctx).run(requests, settings(ctx, batch), system="aegis", bar=bar)
        aegis = run_all.to_dict()
    cb: RunResult = peers.continuous_batching(ctx.model(), requests)
    return {
        "requests": len(requests),
        "aegis_batch_size": batch,
        "aegis": aegis,
        "peer": cb.to_dict(),
        "ratio": ratio(aegis["tokens_per_s"], cb.tokens_per_s),
    }
