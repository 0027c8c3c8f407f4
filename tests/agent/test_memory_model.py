"""The online memory model: prior from the architecture, fit from cycles."""

from __future__ import annotations

import random

import pytest

from services.agent.memory_model import TINYLLAMA_PRIOR, Coefficients, MemoryModel
from shared.schemas import CycleStats

TRUE = Coefficients(base=1.5e9, per_token=40_000.0, per_row=1_000_000.0)


def true_peak(batch: int, seq_len: int, c: Coefficients = TRUE) -> float:
    return c.base + c.per_token * batch * seq_len + c.per_row * batch


def feed(model: MemoryModel, n: int, noise: float, seed: int = 1) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        batch = rng.choice([1, 2, 4, 8, 16, 32, 64])
        prompt = rng.choice([32, 100, 250, 500, 1000])
        peak = true_peak(batch, prompt + 64) * (1 + rng.gauss(0, noise))
        model.observe(batch, prompt, 64, "bf16", peak)


def test_prior_alone_follows_the_architecture() -> None:
    model = MemoryModel()
    assert model.observations == 0
    assert model.coefficients == TINYLLAMA_PRIOR
    # 2.2 GB of weights + 22,528 bytes per token of KV cache (+ per-row logits).
    expected = 2.2e9 + 22_528 * 8 * 1024 + 256_000 * 8
    assert model.predict_peak(8, 1000, 24, "bf16") == pytest.approx(expected)
    assert model.predict_peak(8, 1000, 24, "fp16") == model.predict_peak(8, 1000, 24, "bf16")
    assert model.predict_peak(8, 1000, 24, "fp32") == pytest.approx(2 * expected)


def test_fit_recovers_known_coefficients() -> None:
    model = MemoryModel()
    feed(model, 60, noise=0.001)
    c = model.coefficients
    assert c.base == pytest.approx(TRUE.base, rel=0.03)
    assert c.per_token == pytest.approx(TRUE.per_token, rel=0.03)
    assert c.per_row == pytest.approx(TRUE.per_row, rel=0.25)
    for batch, seq in ((3, 700), (48, 300), (128, 1024)):  # incl. beyond the data
        assert model.predict_peak(batch, seq, 0, "bf16") == pytest.approx(
            true_peak(batch, seq), rel=0.02
        )


def test_fit_is_robust_to_a_few_outliers() -> None:
    model = MemoryModel()
    feed(model, 60, noise=0.001)
    for _ in range(4):  # cycles measured while something else spiked the peak
        model.observe(16, 500, 64, "bf16", 3 * true_peak(16, 564))
    c = model.coefficients
    assert c.per_token == pytest.approx(TRUE.per_token, rel=0.05)
    assert c.base == pytest.approx(TRUE.base, rel=0.05)


def test_fp32_cycles_fit_in_bf16_units() -> None:
    model = MemoryModel()
    rng = random.Random(5)
    for _ in range(40):
        batch, prompt = rng.choice([1, 4, 16, 64]), rng.choice([100, 400, 900])
        model.observe(batch, prompt, 100, "fp32", 2 * true_peak(batch, prompt + 100))
    assert model.coefficients.per_token == pytest.approx(TRUE.per_token, rel=0.03)
    assert model.predict_peak(8, 400, 100, "bf16") == pytest.approx(true_peak(8, 500), rel=0.02)


def test_max_batch_within_matches_predictions() -> None:
    model = MemoryModel()
    feed(model, 40, noise=0.0)
    budget = 20e9
    best = model.max_batch_within(budget, 900, 100, "bf16")
    assert best > 1
    assert model.predict_peak(best, 900, 100, "bf16") <= budget
    assert model.predict_peak(best + 1, 900, 100, "bf16") > budget
    assert model.max_batch_within(1e9, 900, 100, "bf16") == 0  # weights alone don't fit


def test_cycles_and_bad_measurements() -> None:
    model = MemoryModel()
    cycle = CycleStats(
        worker_id="w", settings_version=1, batch_size=8, max_prompt_len=200,
        mean_prompt_len=100, max_new_tokens=56, precision="bf16", max_seq_len=2048,
        tokens_generated=400, tokens_per_s=100.0, latency_s=1.0, padding_ratio=0.3,
        memory_peak_bytes=int(true_peak(8, 256)),
    )  # fmt: skip
    assert model.observe_cycle(cycle)
    assert not model.observe_cycle(cycle.model_copy(update={"memory_peak_bytes": None}))
    model.observe(0, 100, 10, "bf16", 5e9)  # no rows
    model.observe(4, 100, 10, "bf16", -1.0)  # nonsense peak
    assert model.observations == 1
