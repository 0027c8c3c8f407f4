"""A memory model of the worker's peak GPU memory per batch shape, learnt online.

Model (bytes at bf16; other precisions scale the terms, see :data:`PRECISION_SCALE`)::

    peak = base + per_token * batch * (prompt_len + new_tokens) + per_row * batch

``base`` is what does not depend on the batch (weights, workspace); ``per_token`` is
the KV cache plus the activations per position of the padded batch; ``per_row`` what
each sequence costs regardless of length (logits over the vocabulary, sampling buffers).

The fit is a weighted least squares over the last ``window`` cycles (``memory_peak_bytes``
with their batch shapes), made robust by Huber re-weighting (a cycle measured while
something else ran does not drag the line) and kept non-negative. A prior from the
architecture (ARCHITECTURE.md: TinyLlama bf16 weights 2.2 GB, KV cache 22,528 bytes per
token) enters as a weak ridge penalty, so predictions are sensible before any data and
data overrides them once it arrives. Pure code: no Redis, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from shared.schemas import CycleStats, Precision

# (scale of base, scale of per-token and per-row terms) relative to bf16. fp16 == bf16;
# fp32 doubles everything; int8 weight-only quantisation halves the weights, not the KV.
PRECISION_SCALE: dict[str, tuple[float, float]] = {
    "fp32": (2.0, 2.0),
    "bf16": (1.0, 1.0),
    "fp16": (1.0, 1.0),
    "int8": (0.5, 1.0),
}
# How firmly each prior coefficient is held. The weights' size is known exactly, the
# per-token and per-row costs less so: when the data can't tell them apart (one shape
# only), unexplained memory goes to the batch-dependent terms, the cautious side.
PRIOR_STIFFNESS = (2.0, 1.0, 1.0)
# The feature values (bf16) at which a deviation from the prior is measured: one model,
# a batch of 16 sequences of 1,024 tokens, 16 rows.
PRIOR_REFERENCE = (1.0, 16.0 * 1024.0, 16.0)
HUBER_K = 2.0
HUBER_FLOOR = 0.01  # of the median peak: measurement noise assumed at least this
ROBUST_ROUNDS = 3


@dataclass(frozen=True)
class Coefficients:
    """Bytes at bf16: fixed, per token of the padded batch, per sequence."""

    base: float
    per_token: float
    per_row: float


# TinyLlama at bf16: 1.1B params * 2 bytes; KV 2 x 22 layers x 4 heads x 64 dims x 2 bytes;
# per row: logits of the last position over 32,000 tokens at fp32, twice (logits + softmax).
TINYLLAMA_PRIOR = Coefficients(base=2.2e9, per_token=22_528.0, per_row=256_000.0)


@dataclass(frozen=True)
class Shape:
    """One measured cycle: its padded batch shape, precision and peak memory."""

    batch: int
    seq_len: int
    precision: Precision
    peak_bytes: float


def _features(batch: float, seq_len: float, precision: str) -> np.ndarray:
    base_scale, var_scale = PRECISION_SCALE[precision]
    return np.array([base_scale, var_scale * batch * seq_len, var_scale * batch])


class MemoryModel:
    """Online fit of peak memory; :meth:`predict_peak` and :meth:`max_batch_within`."""

    def __init__(
        self,
        prior: Coefficients = TINYLLAMA_PRIOR,
        prior_weight: float = 0.25,
        window: int = 256,
    ) -> None:
        """``prior_weight``: how firmly the prior holds (see :meth:`_design`);
        ``window``: how many recent cycles the fit uses."""
        self.prior = prior
        self.prior_weight = prior_weight
        self.samples: deque[Shape] = deque(maxlen=window)
        self._coef: Coefficients | None = prior

    @property
    def observations(self) -> int:
        """How many measured cycles the fit currently uses."""
        return len(self.samples)

    def observe(
        self, batch: int, prompt_len: int, new_tokens: int, precision: Precision, peak_bytes: float
    ) -> None:
        """Add one measured peak; bad measurements (non-positive) are ignored."""
        if batch < 1 or peak_bytes <= 0 or prompt_len + new_tokens < 1:
            return
        self.samples.append(Shape(batch, prompt_len + new_tokens, precision, float(peak_bytes)))
        self._coef = None

    def observe_cycle(self, cycle: CycleStats) -> bool:
        """Add a cycle's peak if it has one; ``True`` when it did."""
        if cycle.memory_peak_bytes is None:
            return False
        self.observe(
            cycle.batch_size,
            cycle.max_prompt_len,
            cycle.max_new_tokens,
            cycle.precision,
            cycle.memory_peak_bytes,
        )
        return cycle.memory_peak_bytes > 0

    @property
    def coefficients(self) -> Coefficients:
        """The current fit (refitted lazily after new observations)."""
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def predict_peak(
        self, batch: int, prompt_len: int, new_tokens: int, precision: Precision
    ) -> float:
        """Predicted peak bytes of one batch of ``batch`` sequences of that padded shape."""
        c = self.coefficients
        x = _features(batch, prompt_len + new_tokens, precision)
        return float(x @ np.array([c.base, c.per_token, c.per_row]))

    def max_batch_within(
        self, budget_bytes: float, prompt_len: int, new_tokens: int, precision: Precision
    ) -> int:
        """The largest batch predicted to peak within ``budget_bytes`` (0 if none fits)."""
        c = self.coefficients
        base_scale, var_scale = PRECISION_SCALE[precision]
        per_seq = var_scale * (c.per_token * (prompt_len + new_tokens) + c.per_row)
        room = budget_bytes - base_scale * c.base
        if room < per_seq:
            return 0
        if per_seq <= 0:
            return 1 << 20  # the fit says sequences cost nothing: no memory bound
        return int(room // per_seq)

    def _fit(self) -> Coefficients:
        x, y, prior_w, is_data = self._design()
        weights = prior_w.copy()
        coef = _nonneg_lstsq(x, y, weights)
        for _ in range(ROBUST_ROUNDS if is_data.any() else 0):
            residual = y - x @ coef
            # Robust sigma, floored: with near-exact data the prior's own pull must not
            # make every measured cycle look like an outlier.
            mad = 1.4826 * float(np.median(np.abs(residual[is_data])))
            scale = max(mad, HUBER_FLOOR * float(np.median(y[is_data])))
            # Huber: rows further than HUBER_K robust sigmas away count less (data rows only).
            huber = np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(residual), 1e-9))
            weights = np.where(is_data, huber, prior_w)
            coef = _nonneg_lstsq(x, y, weights)
        return Coefficients(float(coef[0]), float(coef[1]), float(coef[2]))

    def _design(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Features, targets, weights and a data mask: prior rows first, then data.

        The prior is a ridge penalty toward its coefficients, measured by the effect of a
        deviation at a reference batch (:data:`PRIOR_REFERENCE`): moving one coefficient
        costs as much as one cycle mispredicted by that effect (times its stiffness).
        Data that pins a coefficient overrides it; directions the data can't tell apart
        (every cycle of one shape) are filled in by the prior.
        """
        p = (self.prior.base, self.prior.per_token, self.prior.per_row)
        rows: list[np.ndarray] = []
        targets: list[float] = []
        for j, value in enumerate(p):
            row = np.zeros(3)
            row[j] = PRIOR_REFERENCE[j] * PRIOR_STIFFNESS[j] * self.prior_weight
            rows.append(row)
            targets.append(float(row[j] * value))
        n_prior = len(rows)
        for s in self.samples:
            rows.append(_features(s.batch, s.seq_len, s.precision))
            targets.append(s.peak_bytes)
        is_data = np.arange(len(rows)) >= n_prior
        return np.array(rows), np.array(targets), np.ones(len(rows)), is_data


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares with non-negative coefficients (active set over 3 terms)."""
    active = [True] * x.shape[1]
    coef = np.zeros(x.shape[1])
    sw = np.sqrt(w)
    for _ in range(x.shape[1]):
        cols = [i for i, a in enumerate(active) if a]
        xs = x[:, cols] * sw[:, None]
        norms = np.linalg.norm(xs, axis=0)
        norms[norms == 0] = 1.0  # a column of zeros: keep lstsq well defined
        sol, *_ = np.linalg.lstsq(xs / norms, y * sw, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[cols] = sol / norms
        negative = [i for i in cols if coef[i] < 0]
        if not negative:
            return coef
        active[min(negative, key=lambda i: coef[i])] = False
    return np.maximum(coef, 0.0)
