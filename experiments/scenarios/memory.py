"""Memory: peak memory vs sequence length, measured, and the agent's memory model fitted.

Two series of single batches through AEGIS's engine: prompt length varied (few new
tokens) and generated length varied (short prompt). The agent's :class:`MemoryModel`
(prior from the architecture) is fitted to every measured point; the report shows
prior, fit and measurement side by side, plus a held-out check: fitted on the prompt
series only, how well it predicts the generated series.

On a GPU a point is ``torch.cuda.max_memory_allocated`` of its batch. A CPU has no
allocator peak: there the point is an analytic estimate (weights + KV cache + one
layer's prefill activations + logits), labelled as such: the smoke run checks the code
path, not the figures.
"""

from __future__ import annotations

import statistics
from typing import Any

from experiments import workloads
from experiments.context import BenchContext
from experiments.scenarios.common import architecture_prior
from services.agent.memory_model import MemoryModel
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import LoadedModel, parameter_bytes
from shared.schemas import GenerationRequest, Precision


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("memory")
    prompt_points = _series(ctx, "prompt", cfg["prompt_series"])
    generated_points = _series(ctx, "generated", cfg["generated_series"])
    points = prompt_points + generated_points
    prior = architecture_prior(ctx.model())
    full_fit = _fit(points, ctx.precision, prior)
    held_out = _fit(prompt_points, ctx.precision, prior)
    for p in points:
        shape = (p["batch_size"], p["prompt_len"], p["new_tokens"], ctx.precision)
        p["fitted_bytes"] = full_fit.predict_peak(*shape)
        p["prior_bytes"] = MemoryModel(prior=prior).predict_peak(*shape)
        p["held_out_bytes"] = held_out.predict_peak(*shape)
    coef = full_fit.coefficients
    return {
        "config": cfg,
        "memory_source": "cuda_max_allocated" if ctx.cuda else "analytic_estimate_cpu",
        "points": points,
        "fit": {
            "base_bytes": coef.base,
            "per_token_bytes": coef.per_token,
            "per_row_bytes": coef.per_row,
        },
        "prior": {
            "base_bytes": prior.base,
            "per_token_bytes": prior.per_token,
            "per_row_bytes": prior.per_row,
        },
        "prediction_error": {
            "fit_mean_abs_rel": _error(points, "fitted_bytes"),
            "prior_mean_abs_rel": _error(points, "prior_bytes"),
            "held_out_generated_mean_abs_rel": _error(generated_points, "held_out_bytes"),
        },
    }


def _series(ctx: BenchContext, name: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    lengths = spec["prompt_lens"]
    news = spec["new_tokens"] if isinstance(spec["new_tokens"], list) else [spec["new_tokens"]]
    shapes = [(b, p, n) for b in spec["batch_sizes"] for p in lengths for n in news]
    # The activation memory model is the batch engine's (HF generate): its peak grows with
    # batch x length, which the engine core's preallocated paged pool does not.
    batch_engine = HFGenerateEngine(ctx.model())
    points = []
    with ctx.bar(len(shapes), f"memory {name}") as bar:
        for batch, prompt, new in shapes:
            requests = _batch(ctx, f"{name}-b{batch}-p{prompt}-n{new}", batch, prompt, new)
            limits = BatchLimits(max_seq_len=ctx.model().context_length, ignore_eos=True)
            outcome = batch_engine.run(requests, limits)
            measured = outcome.memory_peak_bytes
            if measured is None:
                measured = analytic_peak(ctx.model(), batch, prompt, new)
            points.append(
                {
                    "series": name,
                    "batch_size": batch,
                    "prompt_len": prompt,
                    "new_tokens": new,
                    "seq_len": prompt + new,
                    "peak_bytes": int(measured),
                    "tokens_per_s": round(outcome.tokens_per_s, 3),
                }
            )
            bar.update(1)
    return points


def _batch(
    ctx: BenchContext, tag: str, batch: int, prompt: int, new: int
) -> list[GenerationRequest]:
    phase = workloads.Phase(tag, batch, (prompt, prompt), (new, new))
    return workloads.phase_requests(phase, "MEM", ctx.seed, ctx.vocab_size())


def _fit(points: list[dict[str, Any]], precision: Precision, prior: Any) -> MemoryModel:
    model = MemoryModel(prior=prior)
    for p in points:
        model.observe(p["batch_size"], p["prompt_len"], p["new_tokens"], precision, p["peak_bytes"])
    return model


def _error(points: list[dict[str, Any]], key: str) -> float | None:
    errors = [
        abs(p[key] - p["peak_bytes"]) / p["peak_bytes"] for p in points if p["peak_bytes"] > 0
    ]
    return round(statistics.fmean(errors), 4) if errors else None


def analytic_peak(loaded: LoadedModel, batch: int, prompt: int, new: int) -> int:
    """Bytes a batch needs by the model's shapes (CPU stand-in for a measured peak)."""
    cfg = loaded.model.config
    size = next(loaded.model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * head_dim
        * size
        * batch
        * (prompt + new)
    )
    activations = batch * prompt * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * size
    logits = batch * cfg.vocab_size * 4 * 2
    return parameter_bytes(loaded.model) + kv + activations + logits
