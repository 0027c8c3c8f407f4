"""Elastic (W3 on the engine core): a neighbour process takes most of the GPU mid-run and
gives it back; AEGIS's KV pool makes room for it and takes the memory again, live.

Requests arrive at a steady rate (the engine keeps up). A neighbour process
(:mod:`experiments.neighbour`) takes memory as a polite tenant would: chunk by chunk,
and when the device is full it waits and tries again until a deadline. On the run's
timeline it grows to ``60 %`` of the contested memory (what was free plus AEGIS's pool
when the run began), later to ``90 %``, then frees it all. Systems, each on the same
requests and timeline:

* ``aegis`` - the engine core with the agent in the loop: the agent sees the other
  process's memory in every window and resizes the pool (shrink at once, grow back after
  its cooldown); the pool starts as large as the agent would size it on an idle card;
* ``aegis_agent_off`` - the same core and pool, static (what vLLM, TGI and SGLang do:
  size the cache once at start-up);
* ``hf_static`` - HF ``generate`` batch-at-a-time on the same arrivals (no pool; its
  allocator's cache grows with the batches), stopped after ``peer_timeout_s``.

Reported per system: requests answered / failed / lost, OOMs, tokens/s per phase
(before, 60 %, 90 %, after), and for every growth of the neighbour whether it got its
memory, how long it waited and how many of its allocations the full device refused.
For AEGIS also the pool over time and every live resize (blocks, moves, preemptions,
pause). On CPU there is no device to fill: the card is virtual (``cpu_card_bytes``) and
the agent sees the neighbour's host memory as the other tenant; the code path is
checked, the figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from experiments.context import BenchContext
from experiments.measure import rate_between
from experiments.neighbour import Neighbour, NeighbourEvent
from experiments.runner import timeline
from experiments.scenarios.bursty import batch_at_a_time
from experiments.scenarios.common import attempt, closed_loop, idle_card_pool, runner, settings
from experiments.workloads import FIRST_ID
from services.agent.policy import MemoryView
from services.worker.core.engine import EngineCore
from services.worker.precision import free_memory
from shared.schemas import CycleStats, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

GIB = 1 << 30
GROWTH_EVENTS = ("grown", "gave_up", "shrunk")


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("elastic")
    requests, arrivals = workload(ctx, cfg)
    core = ctx.core()
    out: dict[str, Any] = {"config": cfg, "requests": len(requests)}
    with Neighbour(ctx.device) as neighbour:
        card = Card.measure(ctx, core, cfg)
        out["card"] = asdict(card)
        phases = [Phase(float(p["at_s"]), int(p["fraction"] * card.contested))
                  for p in cfg["phases"]]  # fmt: skip
        for system in ("aegis", "aegis_agent_off"):
            out[system] = _aegis(ctx, cfg, card, phases, neighbour, requests, arrivals, system)
            neighbour.release()
        if ctx.wants("eager"):
            core.resize_kv(GIB)  # the peer gets the card, as AEGIS did (less the neighbour)
            out["hf_static"] = attempt(
                "batch-at-a-time peer",
                lambda: _static(ctx, cfg, phases, neighbour, requests, arrivals),
            )
            neighbour.release()
    core.apply(settings(ctx, core.limits.max_num_seqs))  # the shared core's pool back
    return out


def workload(ctx: BenchContext, cfg: dict[str, Any]) -> tuple[list[GenerationRequest], list[float]]:
    """Poisson arrivals at ``rate`` for ``seconds``; uniform prompts and budgets."""
    rng = random.Random(f"{ctx.seed}:elastic")
    vocab, bos = ctx.vocab_size(), ctx.model().tokenizer.bos_token_id or 1
    requests: list[GenerationRequest] = []
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(cfg["rate"])
        if t >= cfg["seconds"]:
            return requests, arrivals
        length = rng.randint(*cfg["prompt"])
        ids = [bos] + [rng.randrange(FIRST_ID, vocab) for _ in range(length - 1)]
        params = SamplingParams(max_tokens=rng.randint(*cfg["new_tokens"]), temperature=0.0,
                                ignore_eos=True)  # fmt: skip
        requests.append(GenerationRequest(id=f"elastic-{len(requests):05d}", prompt="",
                                          prompt_token_ids=ids, params=params))  # fmt: skip
        arrivals.append(round(t, 4))


@dataclass(frozen=True)
class Card:
    """The memory AEGIS and the neighbour compete for, measured before the runs."""

    total_bytes: int
    start_pool_bytes: int  # the pool the agent would give AEGIS on an idle card
    contested: int  # free + that pool: what the neighbour's fractions are of
    virtual: bool  # CPU: no device; the card is cfg["cpu_card_bytes"]

    @classmethod
    def measure(cls, ctx: BenchContext, core: EngineCore, cfg: dict[str, Any]) -> Card:
        free_memory()
        if not ctx.cuda:
            total = int(cfg["cpu_card_bytes"])
            memory = core.stats().memory
            weights = memory.weights if memory is not None else 0
            pool = int(0.9 * total) - weights
            return cls(total, pool, total - weights, True)
        import torch

        total = int(torch.cuda.get_device_properties(core.device).total_memory)
        pool = idle_card_pool(core) or 0
        core.resize_kv(pool)
        free, _ = torch.cuda.mem_get_info(core.device)
        return cls(total, core.runner.memory.kv_bytes if core.runner.memory else pool,
                   int(free) + pool, False)  # fmt: skip


@dataclass
class Phase:
    at_s: float
    target_bytes: int


@dataclass
class Growth:
    """One ``grow_to`` of the neighbour, as its events told it."""

    target_bytes: int
    started_s: float | None = None
    outcome: str | None = None  # grown / gave_up / shrunk
    ended_s: float | None = None
    held_bytes: int = 0
    refused_allocations: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def to_dict(self) -> dict[str, Any]:
        wait = None
        if self.started_s is not None and self.ended_s is not None:
            wait = round(self.ended_s - self.started_s, 3)
        return {
            "target_gib": round(self.target_bytes / GIB, 2),
            "outcome": self.outcome or "unfinished",
            "held_gib": round(self.held_bytes / GIB, 2),
            "t_start_s": None if self.started_s is None else round(self.started_s, 3),
            "wait_s": wait,
            "refused_allocations": self.refused_allocations,
        }


@dataclass
class Timeline:
    """Sends the neighbour its phases at their times (a thread) and keeps its events,
    relative to the run's start."""

    neighbour: Neighbour
    phases: list[Phase]
    deadline_s: float
    chunk_bytes: int
    growths: list[Growth] = field(default_factory=list)
    held: list[tuple[float, int]] = field(default_factory=list)  # (t, neighbour bytes)
    origin: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Timeline:
        self.neighbour.on_event = self._on_event
        self.origin = time.monotonic()
        self.held.append((0.0, 0))
        threading.Thread(target=self._drive, name="elastic-phases", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.neighbour.on_event = None

    def _drive(self) -> None:
        """Each phase at its time, but never before the last one's growth ended (a phase
        late on a slow machine starts late; it is never cut short)."""
        for phase in self.phases:
            if self._stop.wait(max(0.0, self.origin + phase.at_s - time.monotonic())):
                return
            growth = Growth(phase.target_bytes)
            self.growths.append(growth)
            self.neighbour.grow_to(phase.target_bytes, self.chunk_bytes, self.deadline_s)
            while not growth.done.wait(0.05):
                if self._stop.is_set():
                    return

    def _on_event(self, event: NeighbourEvent) -> None:
        if not self.growths:
            return
        growth, t = self.growths[-1], event.t - self.origin
        if event.kind == "grow_start":
            growth.started_s = t
        elif event.kind == "held":
            self.held.append((t, event.spike_bytes))
        elif event.kind in GROWTH_EVENTS:
            growth.outcome, growth.ended_s = event.kind, t
            growth.held_bytes, growth.refused_allocations = event.spike_bytes, event.retries
            self.held.append((t, event.spike_bytes))
            growth.done.set()

    def neighbour_bytes(self) -> int:
        return self.held[-1][1]

    def segments(self, rows: list[list[float]], end: float) -> dict[str, float]:
        """Tokens/s before the first phase, in each phase, and after the last."""
        bounds = [0.0] + [min(end, p.at_s) for p in self.phases] + [end]
        names = ["before"] + [f"phase_{i + 1}" for i in range(len(self.phases))]
        return {f"tokens_per_s_{n}": round(rate_between(rows, a, b), 3)
                for n, a, b in zip(names, bounds, bounds[1:], strict=False)}  # fmt: skip


def _aegis(
    ctx: BenchContext,
    cfg: dict[str, Any],
    card: Card,
    phases: list[Phase],
    neighbour: Neighbour,
    requests: list[GenerationRequest],
    arrivals: list[float],
    system: str,
) -> dict[str, Any]:
    run = runner(ctx)
    core = run.core
    start = settings(ctx, cfg["max_num_seqs"]).model_copy(
        update={"kv_budget_bytes": card.start_pool_bytes}
    )
    loop = None
    if system == "aegis":
        loop = closed_loop(ctx, cfg["max_num_seqs"])
        loop.state.settings = start
    resizes_before = len(core.resizes)
    with Timeline(neighbour, phases, cfg["neighbour_deadline_s"], cfg["chunk_bytes"]) as line:
        if loop is not None and card.virtual:
            loop.memory_view = _virtual_view(card, core, line)
            # No CUDA context on a virtual card: nothing beyond what the view counts.
            loop.policy.config = dataclasses.replace(
                loop.policy.config, overhead_bytes=0, min_kv_bytes=card.total_bytes // 32
            )
        with ctx.bar(len(requests), f"elastic {system}") as bar:
            result, cycles = run.run(requests, start, system=system, loop=loop, bar=bar,
                                     arrivals=arrivals)  # fmt: skip
        _wait_growths(line)
    rows = timeline(cycles)
    resizes = core.resizes[resizes_before:]
    out = {
        **result.to_dict(),
        **line.segments(rows, result.seconds),
        "neighbour": [g.to_dict() for g in line.growths],
        "neighbour_held": [[round(t, 3), b] for t, b in line.held],
        "pool": [[c.t_end, c.kv_pool_bytes] for c in cycles],
        "resizes": [{**asdict(r), "seconds": round(r.seconds, 4)} for r in resizes],
        "max_resize_pause_s": round(max((r.seconds for r in resizes), default=0.0), 4),
        "decisions": loop.decisions if loop is not None else [],
        "timeline": rows,
    }
    return out


def _static(
    ctx: BenchContext,
    cfg: dict[str, Any],
    phases: list[Phase],
    neighbour: Neighbour,
    requests: list[GenerationRequest],
    arrivals: list[float],
) -> dict[str, Any]:
    free_memory()
    with Timeline(neighbour, phases, cfg["neighbour_deadline_s"], cfg["chunk_bytes"]) as line:
        result = batch_at_a_time(ctx, requests, arrivals, cfg)
        _wait_growths(line)
    timings = [t for t in result.extra.pop("timings") if t["error"] is None]
    rows = [[t["first_token"] or t["arrived"], t["finished"], t["tokens"]] for t in timings]
    return {
        **result.to_dict(),
        **line.segments(rows, result.seconds),
        "neighbour": [g.to_dict() for g in line.growths],
        "neighbour_held": [[round(t, 3), b] for t, b in line.held],
    }


def _virtual_view(
    card: Card, core: EngineCore, line: Timeline
) -> Callable[[CycleStats], MemoryView | None]:
    """CPU: the card is virtual; the neighbour's host memory is the other tenant."""

    def view(cycle: CycleStats) -> MemoryView | None:
        memory = core.stats().memory
        own = (memory.weights if memory else 0) + core.stats().kv_bytes
        other = line.neighbour_bytes()
        return MemoryView(card.total_bytes, min(card.total_bytes, own + other), other, own)

    return view


def _wait_growths(line: Timeline, timeout_s: float = 120.0) -> None:
    """Every phase sent and answered (the run may end before the last phase's time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(line.growths) == len(line.phases) and all(g.outcome for g in line.growths):
            return
        time.sleep(0.05)
    log.warning("the neighbour's phases did not all finish in %.0f s", timeout_s)
