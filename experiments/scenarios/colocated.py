"""Colocated: two workers on one GPU, W1 each, against one worker alone on that GPU.

(a) One worker alone on GPU 0 (the default share of the card, AEGIS_GPU_MEMORY_FRACTION
0.9) runs W1 through the whole system. (b) It stops; two workers start on the same GPU
one after the other, each with ``AEGIS_GPU_MEMORY_FRACTION`` = ``gpu_memory_fraction``
(0.45): a worker's KV pool is what the driver reports free after its profiling pass
less the activation peaks, capped at that share of the card less its weights and peaks
(``runner._cuda_kv_bytes``), so the second one, started once the first is up, sizes its
pool with the first one's memory already taken. Both run W1 twice over (copy k: seed +
k) together. Target: combined tokens/s >= ``target_ratio`` x (a), no OOM (the OOM
events the workers published, and no worker that exited), every request answered once.

Both configurations also carry the benchmark's KV budget (``AEGIS_KV_BUDGET_BYTES``, 24
GiB on a GPU, as the system scenario): the per-worker ``kv_pool_mib`` says which bound
held. The benchmark process itself keeps its model on GPU 0. On CPU (tiny) the same
steps run with two CPU workers: a code-path check whose figures mean nothing.

(c) With ``agent_rounds`` > 0, the agent splits the GPU live: the monitor and the agent
run, and ``copies`` workers start on GPU 0 one after the other with no share and no KV
budget set, as a user starting them with the defaults would: the first sizes its pool
for 90 % of the card, the next gets what is left. The agent sees every worker's memory
(the monitor's per-process readings) and sizes each pool to an even share of what the
other processes leave. Then W1 runs ``copies`` times over, ``agent_rounds`` times in a
row (the settings change between and during the rounds, on the agent's cooldowns).
Reported: each round's tokens/s and its ratio to (a), OOMs, answered-once, every
worker's pool over time (its cycle records) and the agent's KV decisions with their
reasons; ``even`` is the smallest pool over the largest at the end. On CPU the monitor
sees no GPU, so the agent has no memory to split: a code-path check only.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from experiments.context import BenchContext
from experiments.scenarios import fleet
from experiments.scenarios.common import ratio
from experiments.scenarios.system import Services
from shared.schemas import DecisionAction

GIB = 1 << 30


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("colocated")
    copies = int(cfg["copies"])
    texts, budgets = fleet.prompts(ctx, cfg["workload"], copies)
    first = len(texts) // copies  # copy 0: the workload itself, at the run's seed
    alone_texts, alone_budgets = texts[:first], budgets[:first]
    gpu = fleet.device_env(ctx, 0)
    share = {**gpu, "AEGIS_GPU_MEMORY_FRACTION": str(cfg["gpu_memory_fraction"])}
    batch = int(cfg["batch_size"])
    where = ("whole GPU", "sharing one GPU") if ctx.cuda else ("CPU", "sharing the CPU")
    label = (f"1 worker, {where[0]}", f"{copies} workers {where[1]}")
    with Services(ctx, batch, [gpu], env=fleet.env_of(cfg), logs="logs/colocated") as services:
        alone = fleet.run_config(services, label[0], alone_texts, alone_budgets)
        services.stop_worker(services.workers()[0])
        for _ in range(copies):  # one after the other: each profiles what the others left
            services.add_worker(share)
        together = fleet.run_config(services, label[1], texts, budgets)
    target = float(cfg["target_ratio"])
    shared = ratio(together["tokens_per_s"], alone["tokens_per_s"])
    split = None
    if int(cfg.get("agent_rounds", 0)) > 0:
        split = agent_split(ctx, cfg, texts, budgets, alone["tokens_per_s"])
    return {
        "workload": cfg["workload"],
        "copies": copies,
        "requests": len(texts),
        "config": cfg,
        "note": "" if ctx.cuda else fleet.CPU_NOTE,
        "alone": alone,
        "together": together,
        "ratio_together_vs_alone": shared,
        "target_ratio": target,
        "meets_target": shared is not None and shared >= target,
        "oom_events": alone["oom_events"] + together["oom_events"],
        "worker_exits": {**alone["worker_exits"], **together["worker_exits"]},
        "agent_split": split,
    }


def agent_split(
    ctx: BenchContext,
    cfg: dict[str, Any],
    texts: list[str],
    budgets: list[int],
    alone_tokens_per_s: float,
) -> dict[str, Any]:
    """(c): workers started with the defaults on one GPU, the agent splitting it live."""
    copies = int(cfg["copies"])
    env = {**fleet.env_of(cfg), **fleet.env_of({"env": cfg.get("agent_env")})}
    env["AEGIS_KV_BUDGET_BYTES"] = "0"  # the pool as the card allows: the agent sizes it
    label = f"{copies} workers, defaults, the agent splitting"
    gpu = fleet.device_env(ctx, 0)
    since = time.time()
    with Services(ctx, int(cfg["batch_size"]), [gpu] * copies, env=env, stagger=True,
                  logs="logs/colocated-agent", control=True) as services:  # fmt: skip
        rounds = [
            fleet.run_config(services, label, texts, budgets)
            for _ in range(int(cfg["agent_rounds"]))
        ]
    # After the services stopped: the record writers have flushed.
    names = {worker_id: name for name, worker_id in services.worker_ids.items()}
    pools = pool_series(services.database, names, since)
    ends = [series[-1][1] for series in pools.values() if series]
    return {
        "label": label,
        "note": ""
        if ctx.cuda
        else "CPU: the monitor sees no GPU, the agent has no memory to split (a code-path check)",
        "rounds": [_round(r, alone_tokens_per_s) for r in rounds],
        "pools_gib": pools,
        "even": round(min(ends) / max(ends), 3) if len(ends) == copies and max(ends) else None,
        "kv_decisions": kv_decisions(services.database, names, since),
        "oom_events": sum(r["oom_events"] for r in rounds),
        "worker_exits": {k: v for r in rounds for k, v in r["worker_exits"].items()},
    }


def _round(run: dict[str, Any], alone_tokens_per_s: float) -> dict[str, Any]:
    return {
        "tokens_per_s": run["tokens_per_s"],
        "ratio_vs_alone": ratio(run["tokens_per_s"], alone_tokens_per_s),
        "exactly_once": run["exactly_once"],
        "oom_events": run["oom_events"],
        "per_worker_tokens_per_s": {n: w["tokens_per_s"] for n, w in run["per_worker"].items()},
    }


def pool_series(database: Path, names: dict[str, str], since: float) -> dict[str, list]:
    """Each worker's KV pool (GiB) at every change, from its cycle records:
    [[seconds after ``since``, GiB], ...] by worker name."""
    series: dict[str, list] = {name: [] for name in names.values()}
    marks = ",".join("?" * len(names))
    with sqlite3.connect(database) as db:
        rows = db.execute(
            f"SELECT worker_id, ts, kv_pool_bytes FROM cycles WHERE ts >= ? AND "
            f"worker_id IN ({marks}) ORDER BY ts",
            (since, *names),
        ).fetchall()
    for worker_id, ts, pool in rows:
        points = series[names[worker_id]]
        gib = round(pool / GIB, 2)
        if not points or points[-1][1] != gib:
            points.append([round(ts - since, 2), gib])
    return series


def kv_decisions(database: Path, names: dict[str, str], since: float) -> list[dict[str, Any]]:
    """The agent's KV budget decisions for these workers: when, whose, and why."""
    marks = ",".join("?" * len(names))
    with sqlite3.connect(database) as db:
        rows = db.execute(
            f"SELECT ts, worker_id, reason FROM decisions WHERE ts >= ? AND action = ? AND "
            f"worker_id IN ({marks}) ORDER BY ts",
            (since, DecisionAction.KV_BUDGET.value, *names),
        ).fetchall()
    return [
        {"at_s": round(ts - since, 2), "worker": names[worker_id], "reason": reason}
        for ts, worker_id, reason in rows
    ]
