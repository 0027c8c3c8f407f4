"""Engine-core check on a GPU: W1 tokens/s at several concurrency limits, decode step
time, and greedy agreement with HF ``generate`` in bf16. Writes core_check.json to $OUT.

    python3 scripts/device/core_check.py --requests 512 --seqs 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from experiments.workloads import Phase, phase_requests
from services.worker.core.engine import CoreConfig, EngineCore
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import load_model
from shared.schemas import GenerationRequest


def w1(count: int, vocab: int) -> list[GenerationRequest]:
    phase = Phase(name="mixed", count=count, prompt=(64, 512), new_tokens=(128, 128))
    return phase_requests(phase, "W1", 0, vocab)


def drain(core: EngineCore, requests: list[GenerationRequest]) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for r in requests:
        core.add(r)
    tokens, steps, decode_s, decode_steps, outputs = 0, 0, 0.0, 0, {}
    while core.has_work:
        out = core.step()
        steps += 1
        if out.stats.prefill_tokens == 0 and out.stats.decode_tokens:
            decode_s += out.stats.seconds
            decode_steps += 1
        for f in out.finished:
            tokens += f.completion_tokens
            outputs[f.request_id] = f
    seconds = time.perf_counter() - started
    return {
        "requests": len(requests),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "steps": steps,
        "decode_steps": decode_steps,
        "mean_decode_step_ms": round(1000 * decode_s / max(1, decode_steps), 3),
        "preemptions": core.stats().preemptions,
        "errors": sum(1 for f in outputs.values() if f.finish_reason == "error"),
        "_outputs": outputs,
    }


def agreement(loaded, sample: list[GenerationRequest]) -> dict:
    """Greedy outputs of the core vs HF generate (one request at a time), token for token."""
    core = EngineCore(loaded, CoreConfig(max_num_seqs=64, ignore_eos=True, kv_budget_bytes=1 << 30))
    mine = drain(core, sample)["_outputs"]
    del core
    hf = HFGenerateEngine(loaded)
    limits = BatchLimits(max_seq_len=2048, ignore_eos=True)
    same, prefix = 0, []
    tok = loaded.tokenizer
    for r in sample:
        ref = hf.run([r], limits).results[0]
        a, b = tok(ref.text).input_ids, tok(mine[r.id].text).input_ids
        same += ref.text == mine[r.id].text
        pairs = zip(a, b, strict=False)
        common = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))
        prefix.append(common / max(1, len(a)))
    return {
        "identical": same,
        "of": len(sample),
        "mean_common_prefix": round(sum(prefix) / len(prefix), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic:tinyllama-1.1b")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--parity", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kv-gib", type=float, default=24.0)
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    parser_device = args.device
    loaded = load_model(args.model, parser_device, "bf16" if parser_device == "cuda" else "fp32")
    vocab = loaded.model.config.vocab_size
    report: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    requests = w1(args.requests, vocab)
    variants = [(seqs, True) for seqs in args.seqs] + [(args.seqs[0], False)]
    for seqs, kernel in variants:
        t0 = time.perf_counter()
        config = CoreConfig(max_num_seqs=seqs, max_batched_tokens=args.tokens, ignore_eos=True,
                            paged_kernel=kernel, kv_budget_bytes=int(args.kv_gib * (1 << 30)))  # fmt: skip
        core = EngineCore(loaded, config)
        graphs = core.warm_up()
        setup = time.perf_counter() - t0
        drain(core, w1(64, vocab))  # warm-up run (kernels, allocator)
        run = drain(core, requests)
        run.pop("_outputs")
        run.update(max_num_seqs=seqs, paged_kernel=kernel, graphs=graphs, setup_s=round(setup, 2),
                   kv_blocks=core.stats().kv_blocks_total)  # fmt: skip
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        del core
        torch.cuda.empty_cache()
    report["greedy_agreement"] = {"bf16": agreement(loaded, requests[: args.parity])}
    print(json.dumps(report["greedy_agreement"]), flush=True)
    loaded.model.float()
    loaded.precision = "fp32"
    report["greedy_agreement"]["fp32"] = agreement(loaded, requests[: args.parity])
    print(json.dumps(report["greedy_agreement"]), flush=True)
    (out_dir / "core_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
