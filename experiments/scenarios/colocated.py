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
"""

from __future__ import annotations

from typing import Any

from experiments.context import BenchContext
from experiments.scenarios import fleet
from experiments.scenarios.common import ratio
from experiments.scenarios.system import Services


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
    }
