"""Probe: PyTorch's varlen flash attention (packed sequences, GQA without repeated keys)
against the padded SDPA path the fresh prefill chunks take now; agreement and time.

    python3 scripts/device/varlen_probe.py
"""

from __future__ import annotations

import json
import random

import torch
import torch.nn.functional as F


def padded(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
        ki = k[start : start + n].transpose(0, 1).unsqueeze(0).repeat_interleave(8, 1)
        vi = v[start : start + n].transpose(0, 1).unsqueeze(0).repeat_interleave(8, 1)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def varlen(q, k, v, cu, longest):
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, longest, longest, 0.0, True, False
    )[0]
    return out


def timed(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(repeats):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / repeats


rng = random.Random(0)
lengths = [rng.randint(64, 512) for _ in range(28)]
total = sum(lengths)
q = torch.randn(total, 32, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16)
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
report = {"tokens": total}
try:
    got = varlen(q, k, v, cu, max(lengths))
    want = padded(q, k, v, lengths)
    report["max_abs_diff"] = float((got.float() - want.float()).abs().max())
    report["varlen_ms"] = round(timed(lambda: varlen(q, k, v, cu, max(lengths))), 3)
    report["per_sequence_sdpa_ms"] = round(timed(lambda: padded(q, k, v, lengths)), 3)
except Exception as exc:  # a probe: report what failed
    report["error"] = repr(exc)[:500]
print(json.dumps(report))
