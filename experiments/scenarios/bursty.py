"""Bursty arrivals: requests arrive over time, as users send them, not all at once.

Phases of Poisson arrivals (calm, burst, calm) with heavy-tailed prompt lengths
(log-normal, clipped) and mixed ``max_tokens``. AEGIS's engine core takes each request
the moment it arrives (continuous batching); the peer is the batch-at-a-time engine (HF
``generate`` eager, which AEGIS used to be) taking up to ``static_batch`` arrived
requests per batch. Reported per system: time to first token and end-to-end latency
p50/p99 from each request's arrival, tokens/s over the run, and whether it kept up: how
long after the last arrival the last answer came (``drain_s``). The peer stops after
``peer_timeout_s``; what it had not answered by then is counted, not waited for.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from experiments.context import BenchContext
from experiments.measure import RunResult, sync
from experiments.scenarios.common import attempt, ratio, runner, settings
from experiments.workloads import FIRST_ID
from services.worker.engine import BatchLimits, HFGenerateEngine
from shared.schemas import GenerationRequest, SamplingParams, now


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("bursty")
    requests, arrivals = workload(ctx, cfg)
    with ctx.bar(len(requests), "bursty aegis") as bar:
        aegis, _ = runner(ctx).run(
            requests, settings(ctx, cfg["max_num_seqs"]), system="aegis", bar=bar,
            arrivals=arrivals, keep_timings=True,
        )  # fmt: skip
    result: dict[str, Any] = {
        "config": cfg,
        "requests": len(requests),
        "last_arrival_s": round(max(arrivals), 3),
        "aegis": latency_summary(aegis, max(arrivals)),
    }
    if ctx.wants("eager"):
        peer = attempt(
            "batch-at-a-time peer",
            lambda: latency_summary(batch_at_a_time(ctx, requests, arrivals, cfg), max(arrivals)),
        )
        result["hf_static"] = peer
        if "error" not in peer:
            result["ratio_tokens_per_s"] = ratio(
                result["aegis"]["tokens_per_s"], peer["tokens_per_s"]
            )
    return result


def workload(ctx: BenchContext, cfg: dict[str, Any]) -> tuple[list[GenerationRequest], list[float]]:
    """Seeded requests and their arrival times (seconds after the start)."""
    rng = random.Random(f"{ctx.seed}:bursty")
    vocab, bos = ctx.vocab_size(), ctx.model().tokenizer.bos_token_id or 1
    low, high = cfg["prompt"]
    requests: list[GenerationRequest] = []
    arrivals: list[float] = []
    start = 0.0
    for phase in cfg["phases"]:
        t = start
        while True:
            t += rng.expovariate(phase["rate"])
            if t >= start + phase["seconds"]:
                break
            length = int(
                min(high, max(low, rng.lognormvariate(math.log(cfg["prompt_median"]), 0.8)))
            )
            ids = [bos] + [rng.randrange(FIRST_ID, vocab) for _ in range(length - 1)]
            new = rng.choices(cfg["max_tokens"], weights=cfg["max_tokens_weights"])[0]
            requests.append(
                GenerationRequest(
                    id=f"burst-{len(requests):05d}", prompt="", prompt_token_ids=ids,
                    params=SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True),
                )
            )  # fmt: skip
            arrivals.append(round(t, 4))
        start += phase["seconds"]
    return requests, arrivals


def batch_at_a_time(
    ctx: BenchContext, requests: list[GenerationRequest], arrivals: list[float], cfg: dict[str, Any]
) -> RunResult:
    """The batch engine on the same arrivals: each batch takes what has arrived (FIFO)."""
    engine = HFGenerateEngine(ctx.model())
    limits = BatchLimits(max_seq_len=ctx.model().context_length, ignore_eos=True)
    pending = list(zip(arrivals, requests, strict=True))
    result = RunResult("hf_static", len(requests), batch_size=cfg["static_batch"])
    timings: list[dict[str, Any]] = []
    sync(ctx.device)
    start, wall = time.perf_counter(), now()
    while pending and time.perf_counter() - start < cfg["peer_timeout_s"]:
        elapsed = time.perf_counter() - start
        if pending[0][0] > elapsed:
            time.sleep(pending[0][0] - elapsed)
            continue
        ready = [p for p in pending if p[0] <= elapsed][: cfg["static_batch"]]
        pending = pending[len(ready) :]
        outcome = engine.run([r for _, r in ready], limits)
        sync(ctx.device)
        for (arrived, _), o in zip(ready, outcome.results, strict=True):
            first = o.first_token_at - wall if o.first_token_at else None
            timings.append({"arrived": arrived, "first_token": first,
                            "finished": o.finished_at - wall, "tokens": o.completion_tokens,
                            "error": o.error})  # fmt: skip
    result.seconds = time.perf_counter() - start
    result.completed = sum(1 for t in timings if t["error"] is None)
    result.failed = len(requests) - result.completed
    result.tokens = sum(t["tokens"] for t in timings if t["error"] is None)
    result.extra["timings"] = timings
    result.note = f"{len(pending)} not answered within {cfg['peer_timeout_s']} s" if pending else ""
    return result


def latency_summary(result: RunResult, last_arrival: float) -> dict[str, Any]:
    """Tokens/s, TTFT and end-to-end percentiles from arrival, and how well it kept up."""
    timings = [t for t in result.extra.pop("timings", []) if t["error"] is None]
    ttft = sorted(t["first_token"] - t["arrived"] for t in timings if t["first_token"] is not None)
    e2e = sorted(t["finished"] - t["arrived"] for t in timings)
    finished = max((t["finished"] for t in timings), default=0.0)
    summary = result.to_dict()
    summary.update(
        ttft_p50_s=_pct(ttft, 0.5), ttft_p95_s=_pct(ttft, 0.95), ttft_p99_s=_pct(ttft, 0.99),
        e2e_p50_s=_pct(e2e, 0.5), e2e_p99_s=_pct(e2e, 0.99),
        drain_s=round(max(0.0, finished - last_arrival), 3),
        timeline=[[round(t["arrived"], 3), round(t["finished"], 3)] for t in timings],
    )  # fmt: skip
    return summary


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 4)
