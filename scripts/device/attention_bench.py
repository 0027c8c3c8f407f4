"""GPU benchmark of paged decode attention: the Triton kernel vs gather + SDPA.

TinyLlama shapes (32 query heads, 4 KV heads, D 64, block_size 16, bf16, 22 layers). For
each batch size and context length it times one decode step's attention over all 22
layers (each layer its own cache, so L2 can't hold the KV), checks the kernel's error
against the fp32 reference, sweeps a few launch configs, and times the default config
inside a CUDA graph (how the engine runs it). Prints a table; writes
``$OUT/attention_bench.json``.

    python scripts/device/attention_bench.py [--batches 64 256 512] [--contexts 450 1024]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from services.worker.core.paged_attention import (
    DEFAULT_CONFIG,
    LaunchConfig,
    reference_decode_attention,
    triton_decode_attention,
)

HEADS, KV_HEADS, DIM, BLOCK_SIZE, LAYERS = 32, 4, 64, 16, 22
SWEEP = [
    LaunchConfig(block_n=n, num_warps=w, num_stages=s, num_splits=splits)
    for n, w, s, splits in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), (None, 1))
]


def make_step(batch: int, context: int, seed: int = 0) -> dict:
    """22 layers of caches, one shared block table with every sequence at ``context``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = -(-context // BLOCK_SIZE)
    pool = batch * blocks
    shape = (pool + 1, BLOCK_SIZE, KV_HEADS, DIM)
    caches = [
        (
            torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16),
            torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(LAYERS)
    ]
    wide = torch.randperm(pool, device="cuda", generator=gen).view(batch, blocks)
    tables = torch.full((batch + 8, blocks + 8), pool, dtype=torch.int64, device="cuda")
    tables[:batch, :blocks] = wide
    q = torch.randn(batch, HEADS, DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    mask = torch.arange(blocks * BLOCK_SIZE, device="cuda") < lens[:, None]
    return {
        "q": q, "caches": caches, "tables": tables[:batch, :blocks], "lens": lens,
        "mask": mask[:, None, None, :], "out": torch.empty_like(q),
    }  # fmt: skip


def gather_sdpa(step: dict, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What llama.DecodeAttention did before the kernel: gather blocks, masked SDPA."""
    batch, blocks = step["tables"].shape
    flat = step["tables"].reshape(-1)
    k = keys.index_select(0, flat).view(batch, blocks * BLOCK_SIZE, KV_HEADS, DIM).transpose(1, 2)
    v = values.index_select(0, flat).view(batch, blocks * BLOCK_SIZE, KV_HEADS, DIM)
    out = F.scaled_dot_product_attention(
        step["q"].unsqueeze(2), k, v.transpose(1, 2), attn_mask=step["mask"], enable_gqa=True
    )
    return out.squeeze(2)


def kernel_layers(step: dict, config: LaunchConfig) -> None:
    for keys, values in step["caches"]:
        triton_decode_attention(
            step["q"], keys, values, step["tables"], step["lens"], out=step["out"], config=config
        )


def reference_layers(step: dict) -> None:
    for keys, values in step["caches"]:
        gather_sdpa(step, keys, values)


def time_ms(fn, iters: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(step: dict) -> float:
    """The default config's 22 layers captured in one CUDA graph, replayed."""
    kernel_layers(step, DEFAULT_CONFIG)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel_layers(step, DEFAULT_CONFIG)
    return time_ms(graph.replay)


def errors(step: dict) -> dict:
    keys, values = step["caches"][0]
    args = (step["q"], keys, values, step["tables"], step["lens"])
    want = reference_decode_attention(*(a.float() if a.is_floating_point() else a for a in args))
    got = triton_decode_attention(*args).float()
    sdpa = gather_sdpa(step, keys, values).float()
    scale = want.abs().max()
    return {
        "kernel_max_abs": float((got - want).abs().max()),
        "kernel_rel": float((got - want).abs().max() / scale),
        "sdpa_bf16_rel": float((sdpa - want).abs().max() / scale),
    }


def bench(batch: int, context: int) -> dict:
    step = make_step(batch, context)
    kv_bytes = LAYERS * 2 * batch * context * KV_HEADS * DIM * 2
    sweep = []
    for config in SWEEP:
        ms = time_ms(lambda c=config: kernel_layers(step, c))
        sweep.append({**config.__dict__, "ms": ms})
    best = min(sweep, key=lambda r: r["ms"])
    kernel = time_ms(lambda: kernel_layers(step, DEFAULT_CONFIG))
    row = {
        "batch": batch, "context": context, "kv_gb": kv_bytes / 1e9,
        "kernel_ms": kernel, "kernel_graph_ms": graph_ms(step),
        "reference_ms": time_ms(lambda: reference_layers(step)),
        "best_config": best, "sweep": sweep, **errors(step),
    }  # fmt: skip
    row["kernel_tb_s"] = kv_bytes / row["kernel_graph_ms"] / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--contexts", type=int, nargs="+", default=[450, 1024])
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = []
    header = f"{'B':>4} {'ctx':>5} {'KV GB':>6} {'kern ms':>8} {'graph ms':>8} {'TB/s':>5} "
    print(header + f"{'ref ms':>8} {'rel err':>8} {'best ms':>8} best config", flush=True)
    for batch, context in itertools.product(args.batches, args.contexts):
        r = bench(batch, context)
        rows.append(r)
        torch.cuda.empty_cache()
        b = r["best_config"]
        print(
            f"{batch:>4} {context:>5} {r['kv_gb']:>6.2f} {r['kernel_ms']:>8.3f} "
            f"{r['kernel_graph_ms']:>8.3f} {r['kernel_tb_s']:>5.2f} {r['reference_ms']:>8.3f} "
            f"{r['kernel_rel']:>8.1e} {b['ms']:>8.3f} n={b['block_n']} w={b['num_warps']} "
            f"s={b['num_stages']} splits={b['num_splits']}",
            flush=True,
        )
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "attention_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": rows}, f)


if __name__ == "__main__":
    main()
