"""Adaptive: W2's shifting phases, AEGIS adaptive vs the per-phase oracle vs the default.

* oracle - every candidate batch size runs each phase as static settings on AEGIS's
  engine; the best per phase is the oracle (found with hindsight, per phase).
* default - the static default configuration (batch 16 at full scale).
* AEGIS adaptive - the engine with the agent's policy in a closed loop, starting at the
  default and carried across the phases in order (nothing is reset between phases).

Tokens/s per phase and overall; the adaptive run's decisions and batch sizes over time.
"""

from __future__ import annotations

from typing import Any

from experiments.context import BenchContext
from experiments.runner import cycles_dicts
from experiments.scenarios.common import (
    closed_loop,
    idle_card_pool,
    policy_dict,
    ratio,
    runner,
    settings,
)


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("adaptive")
    phases = ctx.requests(cfg["workload"])
    default = int(cfg["default_batch"])
    candidates = sorted({*cfg["candidate_batches"], default})
    rows = []
    for phase, requests in phases:
        static = {}
        for batch in candidates:
            with ctx.bar(len(requests), f"{phase.name} static b={batch}") as bar:
                result, _ = runner(ctx).run(
                    requests, settings(ctx, batch), system="aegis_static", bar=bar
                )
            static[batch] = result.to_dict()
        best = max(candidates, key=lambda b: static[b]["tokens_per_s"])
        rows.append(
            {
                "phase": phase.name,
                "requests": len(requests),
                "spec": phase.to_dict(),
                "candidates": [static[b] for b in candidates],
                "oracle_batch": best,
                "oracle": static[best],
                "default": static[default],
            }
        )
    adaptive = _adaptive(ctx, phases, default)
    for row, run_ in zip(rows, adaptive["phases"], strict=True):
        row["adaptive"] = run_
        row["ratio_vs_oracle"] = ratio(run_["tokens_per_s"], row["oracle"]["tokens_per_s"])
        row["ratio_vs_default"] = ratio(run_["tokens_per_s"], row["default"]["tokens_per_s"])
    return {
        "workload": cfg["workload"],
        "config": cfg,
        "policy": policy_dict(ctx),
        "phases": rows,
        "overall": _overall(rows),
        "decisions": adaptive["decisions"],
        "cycles": adaptive["cycles"],
    }


def _adaptive(ctx: BenchContext, phases: list, default: int) -> dict[str, Any]:
    loop = closed_loop(ctx, default)
    aegis = runner(ctx)
    pool = idle_card_pool(aegis.core)
    if pool is not None:
        # As a deployed worker starts: its pool sized to the card (which the agent keeps);
        # the first run applies it and captures its graphs before its clock. The static
        # runs keep the benchmark's smaller pool: W2 needs a few GiB, so the size changes
        # nothing there.
        loop.state.settings = loop.state.settings.model_copy(update={"kv_budget_bytes": pool})
    results, cycles, offset = [], [], 0.0
    for phase, requests in phases:
        first_decision = len(loop.decisions)
        with ctx.bar(len(requests), f"{phase.name} adaptive") as bar:
            result, phase_cycles = aegis.run(
                requests, loop.state.settings, system="aegis_adaptive", loop=loop, bar=bar
            )
        data = result.to_dict()
        data["batch_sizes_used"] = sorted({c.batch_setting for c in phase_cycles})
        results.append(data)
        for c in cycles_dicts(phase_cycles):
            cycles.append({**c, "t_end": round(c["t_end"] + offset, 4), "phase": phase.name})
        for decision in loop.decisions[first_decision:]:
            decision.update(t=round(decision["t"] + offset, 3), phase=phase.name)
        offset += result.seconds
    return {"phases": results, "decisions": loop.decisions, "cycles": cycles}


def _overall(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> float:
        tokens = sum(r[key]["tokens"] for r in rows)
        seconds = sum(r[key]["seconds"] for r in rows)
        return round(tokens / seconds, 3) if seconds > 0 else 0.0

    adaptive, oracle, default = total("adaptive"), total("oracle"), total("default")
    return {
        "adaptive_tokens_per_s": adaptive,
        "oracle_tokens_per_s": oracle,
        "default_tokens_per_s": default,
        "ratio_vs_oracle": ratio(adaptive, oracle),
        "ratio_vs_default": ratio(adaptive, default),
        "lost_requests": sum(r["adaptive"]["failed"] for r in rows),
    }
