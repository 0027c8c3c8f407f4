"""OOM: surviving memory pressure. W3 (noisy neighbour) and W4 (long prompts, big batch).

Each workload runs twice on the same requests: AEGIS adaptive (engine + OOM guard +
policy in a closed loop) and a static server (HF ``generate`` at a fixed batch, no
guard: an OOM fails its batch). Reported: OOM events, recoveries, failed/lost requests
(must be 0 for AEGIS) and, for W3, tokens/s before, during and after the neighbour's
allocation.

On a GPU the pressure is real: a neighbour process (:mod:`experiments.neighbour`) may
first hold a ballast so that every process sees a card of ``card_gib``, and in W3 its own
timer thread allocates ``fraction_of_free`` of the then-free memory ``start_s`` seconds
after the run starts (wherever the run is: mid-``generate`` included) and frees it
``hold_s`` seconds later, the same for both systems; the times it reports split the run
into before / during / after. On CPU there is no OOM: an :class:`OomInjector` raises real
``torch.OutOfMemoryError`` for batches over a token bound (W4 always, W3 while the
neighbour holds its spike), so the same guard and policy code runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from experiments import peers
from experiments.context import BenchContext
from experiments.measure import RunResult, rate_between
from experiments.neighbour import Neighbour, NeighbourEvent
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
class TimedSpike:
    """One run's neighbour spike: ``start_s`` after the run starts, held ``hold_s``.

    The neighbour process takes the memory on its own timer (so on a GPU it lands
    wherever the run is then, mid-``generate`` included) and reports when it really
    landed and was freed; on CPU the same reports switch the injector's token bound on
    and off (from the neighbour's reader thread: ``OomInjector`` reads ``max_tokens``
    once per check, a plain attribute, so switching it from another thread is safe; it
    takes effect at the next batch's check, the injector's step 0). Called with the
    run's progress ``(answered, seconds since start)`` it learns when the run started.
    """

    neighbour: Neighbour
    spec: dict[str, Any]
    fault: OomInjector | None
    spike_tokens: int | None
    scheduled: float = 0.0  # monotonic
    run_start: float | None = None  # monotonic, from the first progress call
    landed: float | None = None
    released: float | None = None
    spike_bytes: int = 0

    def begin(self) -> None:
        """Schedule the spike; call right before the run starts."""
        self.neighbour.on_event = self._on_event
        self.scheduled = time.monotonic()
        self.neighbour.spike_at(
            float(self.spec["start_s"]),
            float(self.spec["fraction_of_free"]),
            float(self.spec["hold_s"]),
        )

    def __call__(self, done: int, t: float) -> None:
        if self.run_start is None:
            self.run_start = time.monotonic() - t

    def finish(self) -> None:
        """Free the spike if it is still held (or cancel it) and switch the bound off."""
        self.neighbour.release()  # its release event arrives before the answer
        self.neighbour.on_event = None
        if self.fault is not None:
            self.fault.max_tokens = None

    def _on_event(self, event: NeighbourEvent) -> None:
        if event.kind == "spike" and self.landed is None:
            self.landed, self.spike_bytes = event.t, event.spike_bytes
            if self.fault is not None:
                self.fault.max_tokens = self.spike_tokens
        elif event.kind == "release" and self.landed is not None and self.released is None:
            if self.fault is not None:
                self.fault.max_tokens = None
            self.released = event.t

    def segments(self, rows: list[list[float]], end: float) -> dict[str, Any]:
        """Spike times relative to the run start, and tokens/s before, during, after."""
        origin = self.run_start if self.run_start is not None else self.scheduled
        spike = end if self.landed is None else min(end, max(0.0, self.landed - origin))
        release = end if self.released is None else min(end, max(spike, self.released - origin))
        return {
            "neighbour_spike_bytes": self.spike_bytes,
            "spike_landed": self.landed is not None,
            "t_spike_s": round(spike, 4),
            "t_release_s": round(release, 4),
            "tokens_per_s_before": round(rate_between(rows, 0.0, spike), 3),
            "tokens_per_s_during": round(rate_between(rows, spike, release), 3),
            "tokens_per_s_after": round(rate_between(rows, release, end), 3),
        }


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
            spike = TimedSpike(neighbour, cfg["neighbour"], fault, spike_tokens)
            if system == "aegis":
                result, rows, extra = _aegis(ctx, requests, cfg["aegis_start_batch"], fault, spike)
            else:
                result, rows, extra = _static_w3(ctx, requests, cfg["static_batch"], fault, spike)
            spike.finish()
            out[system] = {**result.to_dict(), **extra, **spike.segments(rows, result.seconds)}
    return out


def _static_w3(
    ctx: BenchContext,
    requests: list[GenerationRequest],
    batch: int,
    fault: OomInjector | None,
    spike: TimedSpike,
) -> tuple[RunResult, list[list[float]], dict[str, Any]]:
    free_memory()  # start from the same empty cache as the AEGIS run
    loaded = ctx.model()
    spike.begin()
    with ctx.bar(len(requests), "oom static") as bar:
        result = peers.hf_static(
            loaded, requests, batch, "hf_static_unguarded", fault=fault, bar=bar, on_batch=spike
        )
    return result, result.extra.pop("timeline"), {}


def _aegis(
    ctx: BenchContext,
    requests: list[GenerationRequest],
    start: int,
    fault: OomInjector | None,
    spike: TimedSpike | None = None,
) -> tuple[RunResult, list[list[float]], dict[str, Any]]:
    loop = closed_loop(ctx, start)
    run = runner(ctx, fault)
    if spike is not None:
        spike.begin()
    with ctx.bar(len(requests), "oom aegis") as bar:
        result, cycles = run.run(
            requests,
            loop.state.settings,
            system="aegis_adaptive",
            loop=loop,
            on_cycle=spike,
            bar=bar,
        )
    extra = {
        "decisions": loop.decisions,
        "batch_sizes_used": sorted({c.batch_setting for c in cycles}),
    }
    return result, timeline(cycles), extra


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
