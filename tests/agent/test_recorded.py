"""The memory model and the policy against figures recorded on an H200.

``data/h200_recorded.json`` holds the measured batch peaks and the W1 sweep of the GPU
run committed under ``results/gpu-h200`` (synthetic TinyLlama-1.1B, bf16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.agent.memory_model import MemoryModel
from services.agent.policy import AgentPolicy
from tests.agent.sim import GIB, OVERHEAD, SimWorker, drive, new_state

RECORDED = json.loads((Path(__file__).parent / "data" / "h200_recorded.json").read_text())
W1_PROMPT, W1_NEW = 512, 128  # the sweep's padded prompt width and new tokens


def _fitted() -> MemoryModel:
    model = MemoryModel()
    for p in RECORDED["memory_points"]:
        model.observe(p["batch_size"], p["prompt_len"], p["new_tokens"], "bf16", p["peak_bytes"])
    return model


def test_model_fitted_on_recorded_peaks_predicts_w1_peaks_on_the_safe_side() -> None:
    model = _fitted()
    for point in RECORDED["w1_sweep"]:
        predicted = model.predict_peak(point["batch_size"], W1_PROMPT, W1_NEW, "bf16")
        # Never below what the GPU measured (that would invite an OOM), at most 25 % above.
        assert point["peak_bytes"] <= predicted <= 1.25 * point["peak_bytes"]


@dataclass
class RecordedWorker(SimWorker):
    """A worker whose peak and tokens/s follow the H200 sweep (interpolated by batch)."""

    def peak(self, batch: int, seq_len: int, precision: str) -> float:
        sweep = RECORDED["w1_sweep"]
        xs = [p["batch_size"] for p in sweep]
        return float(np.interp(batch, xs, [p["peak_bytes"] for p in sweep]))


def _recorded_tps(batch: int) -> float:
    sweep = RECORDED["w1_sweep"]
    xs = [p["batch_size"] for p in sweep]
    return float(np.interp(batch, xs, [p["tokens_per_s"] for p in sweep]))


def test_policy_on_the_recorded_card_grows_without_an_oom() -> None:
    # An 8 GiB card: the recorded batch-128 peak (6.5 GiB) fits under 85 %, 256 does not.
    sim = RecordedWorker(total=8 * GIB, prompt_len=W1_PROMPT, new_tokens=W1_NEW, tps=_recorded_tps)
    policy, state = AgentPolicy(), new_state(batch=16)
    trace = drive(policy, state, sim, 300)
    assert sim.ooms == []
    final = state.settings.batch_size
    assert final > 16  # it used the memory it had
    assert sim.peak(final, 0, "bf16") + OVERHEAD <= 0.85 * sim.total
    assert len(trace.decisions) <= 6  # and settled
