"""GPU check of the worker engine: correctness on CUDA, overhead vs plain generate, OOM guard."""

import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from services.worker.engine import BatchLimits, HFGenerateEngine, combine_outcomes
from services.worker.model import load_model, model_info
from services.worker.oom import run_with_oom_guard
from services.worker.precision import apply_precision, int8_support
from shared.schemas import GenerationRequest, SamplingParams

report = {}
OUT = os.environ.get("OUT", "/tmp")


def log(key, value):
    report[key] = value
    print(key, "=", value, flush=True)


def make(i, plen, new, rng, stream=False, temperature=0.0, **kw):
    ids = [1] + [rng.randrange(4, 32000) for _ in range(plen - 1)]
    return GenerationRequest(
        id=f"r{i}",
        prompt="x",
        prompt_token_ids=ids,
        stream=stream,
        params=SamplingParams(max_tokens=new, temperature=temperature, **kw),
    )


t = time.time()
loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "bf16")
log("load_s", round(time.time() - t, 2))
log("name", loaded.name)
log("cudnn_sdp_enabled", torch.backends.cuda.cudnn_sdp_enabled())
log("alloc_after_load", torch.cuda.memory_allocated())
log("model_info_chars", len(model_info(loaded).tokenizer_json))
engine = HFGenerateEngine(loaded)
limits = BatchLimits(max_seq_len=2048, ignore_eos=True)
rng = random.Random(0)

# 1. correctness: batch vs alone (bf16 on GPU: report agreement of greedy tokens)
reqs = [make(i, n, 16, rng) for i, n in enumerate([5, 40, 130, 77])]
batch = engine.run(reqs, limits)
alone = [engine.run([r], limits).results[0] for r in reqs]
log("batch_vs_alone_equal", [a.text == b.text for a, b in zip(batch.results, alone, strict=True)])
log(
    "mem_stats",
    [batch.memory_allocated_bytes, batch.memory_peak_bytes, batch.memory_reserved_bytes],
)

# streaming + seeded sampling on CUDA
deltas = []
sreqs = [
    make(10, 30, 24, rng, stream=True, temperature=0.9, top_p=0.9, seed=7),
    make(11, 60, 24, rng, stream=True),
]
out = engine.run(sreqs, limits, on_text=deltas.extend)
ok = all(
    "".join(d.text for d in deltas if d.request_id == r.request_id) == r.text for r in out.results
)
again = engine.run([sreqs[0]], limits).results[0].text
log("stream_concat_ok", ok)
log("seeded_reproducible_across_batches", again == out.results[0].text)


# 2. throughput vs plain HF generate on the same batch (W1-like slice)
def w1(n, seed):
    r = random.Random(seed)
    return [make(i, r.randint(64, 512), 128, r) for i in range(n)]


def plain_generate(reqs):
    width = max(r.prompt_len for r in reqs)
    ids = torch.tensor(
        [[0] * (width - r.prompt_len) + r.prompt_token_ids for r in reqs], device="cuda"
    )
    mask = (
        torch.arange(width, device="cuda")[None, :]
        >= torch.tensor([width - r.prompt_len for r in reqs], device="cuda")[:, None]
    ).long()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=128, do_sample=False, pad_token_id=0
        )
    torch.cuda.synchronize()
    return time.perf_counter() - t0


for bs in (16, 64):
    reqs = w1(bs, bs)
    engine.run(reqs, limits)  # warm both paths at these shapes
    plain_generate(reqs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    o = engine.run(reqs, limits)
    torch.cuda.synchronize()
    eng_s = time.perf_counter() - t0
    base_s = plain_generate(reqs)
    log(f"bs{bs}_engine_tok_s", round(o.tokens_generated / eng_s, 1))
    log(f"bs{bs}_plain_generate_tok_s", round(bs * 128 / base_s, 1))
    log(f"bs{bs}_padding_ratio", round(o.padding_ratio, 3))
    # FIFO batches of the same requests (the batch engine's peer setting)
    waiting = w1(4 * bs, 1000 + bs)
    tokens = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pads = []
    while waiting:
        chosen = waiting[:bs]
        waiting = [r for r in waiting if r not in chosen]
        o = engine.run(chosen, limits)
        tokens += o.tokens_generated
        pads.append(round(o.padding_ratio, 3))
    torch.cuda.synchronize()
    log(f"bs{bs}_scheduled_4x_tok_s", round(tokens / (time.perf_counter() - t0), 1))
    log(f"bs{bs}_scheduled_pads", pads)

# 3. precision switching with CUDA memory
for target in ("fp32", "fp16", "bf16"):
    ch = apply_precision(loaded, target)
    log(f"precision_to_{target}", ch.describe())
log("int8_support", int8_support())
if int8_support()[0]:
    try:
        ch = apply_precision(loaded, "int8")
        log("precision_to_int8", ch.describe())
        o = engine.run([make(99, 50, 8, rng)], limits)
        log("int8_run_tokens", o.tokens_generated)
        ch = apply_precision(loaded, "bf16")
        log("precision_int8_to_bf16", ch.describe())
    except Exception as exc:  # report, keep going
        log("int8_error", f"{type(exc).__name__}: {exc}"[:500])
        apply_precision(loaded, "bf16") if loaded.precision != "bf16" else None

# 4. real CUDA OOM under a memory fraction: guard splits, nothing lost
torch.cuda.empty_cache()
total = torch.cuda.get_device_properties(0).total_memory
alloc = torch.cuda.memory_allocated()
fraction = (alloc + 3.0e9) / total
torch.cuda.set_per_process_memory_fraction(fraction, 0)
r = random.Random(5)
big = [make(i, r.randint(1500, 1900), 64, r) for i in range(96)]
events = []
t0 = time.perf_counter()
outs = run_with_oom_guard(
    lambda b: engine.run(b, limits), big, on_oom=events.append, on_fail=engine.fail
)
merged = combine_outcomes(outs, engine.precision)
log("oom_fraction", round(fraction, 3))
log("oom_events", [(e.batch_size, e.recovered, e.action) for e in events])
log(
    "oom_results",
    {
        k: sum(1 for x in merged.results if x.finish_reason == k)
        for k in ("length", "stop", "error")
    },
)
log("oom_run_s", round(time.perf_counter() - t0, 1))
log("oom_peak", merged.memory_peak_bytes)
torch.cuda.set_per_process_memory_fraction(1.0, 0)

with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
