"""Where an engine-core step's time goes on a GPU: the decode graph alone (CUDA events),
its kernels (torch.profiler on the same step run eagerly), a packed prefill step, and the
host side of a whole W1 run (cProfile). Writes profile_core.json and profile_core.txt to
$OUT.

    python3 scripts/device/profile_core.py --rows 256 512 --prefill-tokens 8192
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from experiments.workloads import Phase, phase_requests
from services.worker.core.engine import CoreConfig, EngineCore
from services.worker.core.runner import ModelRunner
from services.worker.core.scheduler import Chunk
from services.worker.model import load_model


@dataclass
class _Row:
    tokens: list[int]


@dataclass
class _Seq:
    """A stand-in sequence: a prompt of ``tokens`` + 1 tokens in its own blocks."""

    tokens: int
    block_table: list[int]

    def __post_init__(self) -> None:
        self.prompt_ids = [5 + (i % 1000) for i in range(self.tokens + 1)]
        self.row = _Row([])

    @property
    def num_tokens(self) -> int:
        return self.tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.prompt_ids[start:end]


def _seqs(rows: int, context: int, block_size: int) -> list[_Seq]:
    per = -(-(context + 1) // block_size)
    return [_Seq(context, list(range(i * per, (i + 1) * per))) for i in range(rows)]


def _cuda_ms(run, repeats: int = 20) -> float:
    run()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def _kernel_table(run, rows: int = 25) -> str:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def decode_profile(runner: ModelRunner, rows: int, context: int, text: list[str]) -> dict:
    seqs = _seqs(rows, context, runner.block_size)
    chunks = [Chunk(s, context, 1) for s in seqs]  # type: ignore[arg-type]
    for c in chunks:  # decode of the token at ``context``: prompt already cached
        c.samples = True
    graph_ms = _cuda_ms(lambda: runner._decode_logits(chunks))
    blocks = len(seqs[0].block_table)
    with torch.inference_mode():
        eager_ms = _cuda_ms(lambda: runner._decode_eager(chunks, blocks))
        text.append(f"## decode eager, {rows} rows, context {context}\n")
        text.append(_kernel_table(lambda: runner._decode_eager(chunks, blocks)))
    host = time.perf_counter()
    for _ in range(20):
        runner._fill_static(chunks, rows, blocks)
    host_ms = 1000 * (time.perf_counter() - host) / 20
    return {"rows": rows, "context": context, "graph_ms": round(graph_ms, 3),
            "eager_ms": round(eager_ms, 3), "inputs_host_ms": round(host_ms, 3)}  # fmt: skip


def prefill_profile(runner: ModelRunner, tokens: int, chunk: int, text: list[str]) -> dict:
    count = tokens // chunk
    seqs = _seqs(count, chunk, runner.block_size)
    chunks = [Chunk(s, 0, chunk) for s in seqs]  # type: ignore[arg-type]
    with torch.inference_mode():
        ms = _cuda_ms(lambda: runner._prefill_logits(chunks), repeats=10)
        text.append(f"## prefill {count} fresh chunks of {chunk}\n")
        text.append(_kernel_table(lambda: runner._prefill_logits(chunks)))
    flops = 2 * sum(p.numel() for p in _linear_weights(runner)) * count * chunk
    return {"tokens": count * chunk, "chunk": chunk, "ms": round(ms, 3),
            "tokens_per_s": round(count * chunk / ms * 1000),
            "linear_tflops": round(flops / ms / 1e9, 1)}  # fmt: skip


def _linear_weights(runner: ModelRunner) -> list[torch.Tensor]:
    out = []
    for layer in runner.weights.layers:
        for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
            out += [w for w, _ in proj.parts]
    return out


def w1_host_profile(core: EngineCore, vocab: int, count: int, text: list[str]) -> dict:
    phase = Phase(name="mixed", count=count, prompt=(64, 512), new_tokens=(128, 128))
    requests = phase_requests(phase, "W1", 0, vocab)
    split = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_steps": 0, "decode_steps": 0}
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    started = time.perf_counter()
    profiler.enable()
    for r in requests:
        core.add(r)
    tokens = 0
    while core.has_work:
        out = core.step()
        kind = "prefill" if out.stats.prefill_tokens else "decode"
        split[f"{kind}_s"] += out.stats.seconds
        split[f"{kind}_steps"] += 1
        tokens += sum(f.completion_tokens for f in out.finished)
    profiler.disable()
    seconds = time.perf_counter() - started
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(30)
    text.append(f"## W1 {count} requests, host profile (cProfile, tottime)\n{buffer.getvalue()}")
    return {"requests": count, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s_under_cprofile": round(tokens / seconds),
            **{k: round(v, 3) for k, v in split.items()}}  # fmt: skip


def w1_loop_profile(core: EngineCore, vocab: int, count: int, text: list[str]) -> dict:
    """The same W1 through the serving loop the worker and the benchmark run (windows,
    settings, deliveries), timed plainly and then under cProfile."""
    from experiments.runner import AegisRunner
    from shared.schemas import ControlSettings

    phase = Phase(name="mixed", count=count, prompt=(64, 512), new_tokens=(128, 128))
    requests = phase_requests(phase, "W1", 0, vocab)
    settings = ControlSettings(batch_size=core.limits.max_num_seqs, max_seq_len=2048,
                               precision=core.precision, max_batched_tokens=8192,
                               kv_budget_bytes=core.kv_budget_bytes)  # fmt: skip
    runner = AegisRunner(core, "cuda")
    plain, _ = runner.run(requests, settings)
    profiler = cProfile.Profile()
    profiler.enable()
    profiled, _ = runner.run(requests, settings)
    profiler.disable()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(30)
    text.append(f"## W1 {count} requests through the serving loop (cProfile)\n{buffer.getvalue()}")
    return {"tokens_per_s": round(plain.tokens_per_s), "seconds": round(plain.seconds, 3),
            "tokens_per_s_under_cprofile": round(profiled.tokens_per_s)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic:tinyllama-1.1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--prefill-chunks", type=int, nargs="+", default=[256, 512, 2048])
    parser.add_argument("--w1", type=int, default=512)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp"))
    loaded = load_model(args.model, "cuda", "bf16")
    core = EngineCore(loaded, CoreConfig(max_num_seqs=max(args.rows), max_batched_tokens=8192,
                                         ignore_eos=True, decode_steps=8,
                                         kv_budget_bytes=24 << 30))  # fmt: skip
    core.warm_up()
    text: list[str] = []
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["decode"] = [decode_profile(core.runner, r, args.context, text) for r in args.rows]
    print(json.dumps(report["decode"]), flush=True)
    report["prefill"] = [
        prefill_profile(core.runner, args.prefill_tokens, c, text) for c in args.prefill_chunks
    ]
    print(json.dumps(report["prefill"]), flush=True)
    report["w1"] = w1_host_profile(core, loaded.model.config.vocab_size, args.w1, text)
    print(json.dumps(report["w1"]), flush=True)
    report["w1_loop"] = w1_loop_profile(core, loaded.model.config.vocab_size, args.w1, text)
    print(json.dumps(report["w1_loop"]), flush=True)
    (out / "profile_core.json").write_text(json.dumps(report, indent=1))
    (out / "profile_core.txt").write_text("\n".join(text))


if __name__ == "__main__":
    main()
