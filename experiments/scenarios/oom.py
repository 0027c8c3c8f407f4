"""OOM: surviving memory pressure. W3 (noisy neighbour) and W4 (long prompts, big batch).

Each workload runs twice on the same requests: AEGIS adaptive (engine + OOM guard +
policy in a closed loop) and a static server (HF ``generate`` at a fixed batch, no
guard: an OOM fails its batch). Reported: OOM events, recoveries, failed/lost requests
(must be 0 for AEGIS) and, for W3, tokens/s before, during and after the neighbour's
allocation.

On a GPU the pressure is real: a neighbour process (:mod:`experiments.neighbour`) may
first hold a ballast so that every process sees a card of ``card_gib``, and in W3 it
allocates ``fraction_of_free`` of the free memory once ``start_at`` of the requests are
answered, freeing it at ``stop_at``. On CPU there is no OOM: an :class:`OomInjector`
raises real ``torch.OutOfMemoryError`` for batches over a token bound (W4 always, W3
while the neighbour "holds" its spike), so the same guard and policy code runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from experiments import peers
from experiments.context import BenchContext
from experiments.measure import RunResult, rate_between
from experiments.neighbour import Neighbour
from experiments.runner import timeline
from experiments.scenarios.common import closed_loop, runner
from services.worker.oom import OomInjector
from services.worker.precision import free_memory
from shared.schemas import GenerationRequest

log = logging.getLogger(__name__)

GIB = 1 << 30


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("oom")
    return {"W3": _noisy_neighbour(ctx, cfg["W3"]), "W4": _pressure(ctx, cfg["W4"])}


@dataclass
class Cue:
    """Signals the neighbour as requests get answered; remembers when (seconds)."""

    neighbour: Neighbour
    total: int
    spec: dict[str, Any]
    fault: OomInjector | None
    spike_tokens: int | None
    t_spike: float | None = None
    t_release: float | None = None
    spike_bytes: int = 0

    def __call__(self, done: int, t: float) -> None:
        if self.t_spike is None and done >= self.spec["start_at"] * self.total:
            self.t_spike = t
            # On a GPU the allocation lands while the next batch runs, as a real one would.
            self.neighbour.spike(float(self.spec["fraction_of_free"]), wait=self.fault is not None)
            if self.fault is not None:
                self.fault.max_tokens = self.spike_tokens
        elif (
            self.t_spike is not None
            and self.t_release is None
            and done >= self.spec["stop_at"] * self.total
        ):
            self.finish(t)

    def finish(self, t: float) -> None:
        """Free the spike (if it is still held)."""
        if self.t_spike is None or self.t_release is not None:
            return
        self.spike_bytes = self.neighbour.collect()
        self.neighbour.release()
        if self.fault is not None:
            self.fault.max_tokens = None
        self.t_release = t


def _requests(ctx: BenchContext, name: str) -> list[GenerationRequest]:
    return [r for _, reqs in ctx.requests(name) for r in reqs]


def _neighbour(ctx: BenchContext, cfg: dict[str, Any]) -> Neighbour:
    free_memory()  # our cached blocks back first, or the ballast can't take its share
    neighbour = Neighbour(ctx.device)
    if ctx.cuda and cfg.get("card_gib"):
        neighbour.ballast(int(float(cfg["card_gib"]) * GIB))
    return neighbour


def _noisy_neighbour(ctx: BenchContext, cfg: dict[str, Any]) -> dict[str, Any]:
    requests = _requests(ctx, "W3")
    fault = None if ctx.cuda else OomInjector()  # off until the neighbour's spike
    spike_tokens = cfg.get("cpu_spike_max_tokens")
    out: dict[str, Any] = {"config": cfg, "requests": len(requests)}
    with _neighbour(ctx, cfg) as neighbour:
        out["ballast_bytes"] = neighbour.held
        for system in ("aegis", "static"):
            cue = Cue(neighbour, len(requests), cfg["neighbour"], fault, spike_tokens)
            if system == "aegis":
                result, rows, extra = _aegis(ctx, requests, cfg["aegis_start_batch"], fault, cue)
            else:
                free_memory()  # start from the same empty cache as the AEGIS run
                result = peers.hf_static(
                    ctx.model(),
                    requests,
                    cfg["static_batch"],
                    "hf_static_unguarded",
                    fault=fault,
                    on_batch=cue,
                )
                rows, extra = result.extra.pop("timeline"), {}
            cue.finish(result.seconds)
            out[system] = {**result.to_dict(), **extra, **_segments(rows, cue, result.seconds)}
    return out


def _aegis(
    ctx: BenchContext,
    requests: list[GenerationRequest],
    start: int,
    fault: OomInjector | None,
    cue: Any = None,
) -> tuple[RunResult, list[list[float]], dict[str, Any]]:
    loop = closed_loop(ctx, start)
    with ctx.bar(len(requests), "oom aegis") as bar:
        result, cycles = runner(ctx, fault).run(
            requests, loop.state.settings, system="aegis_adaptive", loop=loop, on_cycle=cue, bar=bar
        )
    extra = {
        "decisions": loop.decisions,
        "batch_sizes_used": sorted({c.batch_setting for c in cycles}),
    }
    return result, timeline(cycles), extra


def _segments(rows: list[list[float]], cue: Cue, end: float) -> dict[str, Any]:
    spike = cue.t_spike if cue.t_spike is not None else end
    release = cue.t_release if cue.t_release is not None else end
    return {
        "neighbour_spike_bytes": cue.spike_bytes,
        "t_spike_s": round(spike, 4),
        "t_release_s": round(release, 4),
        "tokens_per_s_before": round(rate_between(rows, 0.0, spike), 3),
        "tokens_per_s_during": round(rate_between(rows, spike, release), 3),
        "tokens_per_s_after": round(rate_between(rows, release, end), 3),
    }


def _pressure(ctx: BenchContext, cfg: dict[str, Any]) -> dict[str, Any]:
    requests = _requests(ctx, "W4")
    bound = cfg.get("cpu_inject_oom_above_tokens")
    fault = None if ctx.cuda else OomInjector(max_tokens=int(bound or 0) or None)
    out: dict[str, Any] = {"config": cfg, "requests": len(requests)}
    neighbour = _neighbour(ctx, cfg) if ctx.cuda and cfg.get("card_gib") else None
    try:
        out["ballast_bytes"] = neighbour.held if neighbour else 0
        free_memory()
        with ctx.bar(len(requests), "oom static") as bar:
            static = peers.hf_static(
                ctx.model(),
                requests,
                cfg["static_batch"],
                "hf_static_unguarded",
                fault=fault,
                bar=bar,
            )
        static.extra.pop("timeline", None)
        out["static"] = static.to_dict()
        result, _, extra = _aegis(ctx, requests, cfg["aegis_start_batch"], fault)
        out["aegis"] = {**result.to_dict(), **extra}
    finally:
        if neighbour is not None:
            neighbour.close()
    return out
