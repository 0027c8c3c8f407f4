"""Scale-out: W1 at twice its size through the whole system on one GPU, then on two.

One gateway and Redis throughout (as in the system scenario); workers are started once
and reused: (a) one worker on GPU 0; (b) a second worker joins on GPU 1 and the same
load runs on both (target: combined tokens/s >= ``target_ratio`` x (a)); (c) the same
two workers, and once ``kill_at_fraction`` of the answers are in (and the victim holds
requests) the second worker is SIGKILLed: the entries it held stay pending under its
consumer until they have been idle ``AEGIS_VISIBILITY_TIMEOUT_S``, then the other
worker reclaims them (XAUTOCLAIM, on its next pull) and runs them again; every request
must still be answered exactly once. The kill run reports the requests the victim held
at its death and who answered them, and how long after the kill the last of them came.

Each copy of W1 has its own seed (copy k: seed + k). Who answered each request is read
from its completion (``aegis.results[0].worker_id``): see ``fleet.py``. Fewer than two
GPUs: the scenario records that it was skipped. On CPU (tiny) the same steps run with
two CPU workers: a code-path check whose figures mean nothing.
"""

from __future__ import annotations

from typing import Any

from experiments.context import BenchContext
from experiments.scenarios import fleet
from experiments.scenarios.common import ratio
from experiments.scenarios.system import Services

WORKERS = 2


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("scaleout")
    found = fleet.gpus(ctx)
    if ctx.cuda and found < WORKERS:
        return {"skipped": f"needs {WORKERS} GPUs, found {found}", "config": cfg, "gpus": found}
    copies = int(cfg["copies"])
    texts, budgets = fleet.prompts(ctx, cfg["workload"], copies)
    batch = int(cfg["batch_size"])
    first = [fleet.device_env(ctx, 0)]
    where = ("1 GPU", "1 GPU each") if ctx.cuda else ("CPU", "CPU")
    label = (f"1 worker, {where[0]}", f"2 workers, {where[1]}", "2 workers, one killed mid-run")
    with Services(ctx, batch, first, env=fleet.env_of(cfg), logs="logs/scaleout") as services:
        one = fleet.run_config(services, label[0], texts, budgets)
        services.add_worker(fleet.device_env(ctx, 1))
        two = fleet.run_config(services, label[1], texts, budgets)
        victim = services.workers()[-1]
        after = fleet.after_fraction(len(texts), float(cfg["kill_at_fraction"]))
        kill = fleet.Kill(services, victim, after)
        killed = fleet.run_config(services, label[2], texts, budgets, kill)
    target = float(cfg["target_ratio"])
    scale = ratio(two["tokens_per_s"], one["tokens_per_s"])
    return {
        "workload": cfg["workload"],
        "copies": copies,
        "requests": len(texts),
        "config": cfg,
        "gpus": found if ctx.cuda else None,
        "note": "" if ctx.cuda else fleet.CPU_NOTE,
        "one_worker": one,
        "two_workers": two,
        "one_killed": killed,
        "ratio_two_vs_one": scale,
        "target_ratio": target,
        "meets_target": scale is not None and scale >= target,
        "ratio_killed_vs_two": ratio(killed["tokens_per_s"], two["tokens_per_s"]),
    }
