"""Choosing each sequence's next token on the device, in one batched pass.

Greedy rows (temperature 0) take the argmax of the logits. The others sample from the
temperature-scaled, top-p-filtered distribution by an exponential race: the token with
the largest ``p / E`` wins, ``E = -log(u)``, ``u`` uniform. For a row with a seed, ``u``
comes from a counter-based hash of (seed, tokens generated so far, vocabulary index), so
its text depends on its seed and prompt alone, never on the batch it ran in or on a
preemption. No host synchronisation: the caller reads the chosen ids once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.schemas import SamplingParams

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31, so products of 32-bit values stay inside int64.
_MIX_A = 0x7FEB352D
_MIX_B = 0x68E31DA4
_GOLDEN = 0x1E3779B9
SEED_BITS = 64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), elementwise on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` uniforms in (0, 1) from per-row 64-bit seeds and counters."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _mix32(low ^ _mix32(high ^ _mix32(counters * _GOLDEN)))
    index = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(row.unsqueeze(1) ^ _mix32(index * _GOLDEN + 1).unsqueeze(0))
    return (bits.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)


def seed_to_int64(seed: int) -> int:
    """A seed as the signed 64-bit value a tensor holds (seeds are taken modulo 2**64)."""
    value = seed % (1 << SEED_BITS)
    return value - (1 << SEED_BITS) if value >= 1 << (SEED_BITS - 1) else value


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, on the device."""

    all_greedy: bool
    greedy: torch.Tensor | None = None  # bool [rows]
    temperature: torch.Tensor | None = None  # [rows, 1]
    top_p: torch.Tensor | None = None  # [rows, 1], None when every row keeps all
    seeded_rows: torch.Tensor | None = None  # indices of seeded rows
    seeds: torch.Tensor | None = None  # int64 [seeded]
    counters: torch.Tensor | None = None  # int64 [seeded]

    @classmethod
    def build(
        cls, params: list[SamplingParams], generated: list[int], device: torch.device
    ) -> SamplingBatch:
        """``generated[i]``: tokens row ``i`` produced so far (its seeded draw counter)."""
        if all(p.temperature == 0 for p in params):
            return cls(all_greedy=True)
        sampled = [p.temperature > 0 for p in params]
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        top_ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
        rows = [i for i, p in enumerate(params) if p.seed is not None and sampled[i]]
        batch = cls(
            all_greedy=False,
            greedy=_tensor([not s for s in sampled], device, torch.bool),
            temperature=_tensor(temps, device, torch.float32).unsqueeze(1),
            top_p=_tensor(top_ps, device, torch.float32).unsqueeze(1) if min(top_ps) < 1 else None,
        )
        if rows:
            batch.seeded_rows = _tensor(rows, device, torch.int64)
            seeds = [seed_to_int64(int(params[i].seed or 0)) for i in rows]
            batch.seeds = _tensor(seeds, device, torch.int64)
            batch.counters = _tensor([generated[i] for i in rows], device, torch.int64)
        return batch


def _tensor(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The chosen token id of every row (``[rows]`` int64, on the logits' device)."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    assert batch.temperature is not None and batch.greedy is not None
    probs = torch.softmax(logits.float() / batch.temperature, dim=-1)
    if batch.top_p is not None:
        probs = _top_p(probs, batch.top_p)
    uniform = torch.rand_like(probs).clamp_(min=1e-10)
    if batch.seeded_rows is not None:
        assert batch.seeds is not None and batch.counters is not None
        drawn = seeded_uniform(batch.seeds, batch.counters, probs.shape[-1])
        uniform.index_copy_(0, batch.seeded_rows, drawn)
    race = probs / -torch.log(uniform)
    return torch.where(batch.greedy, greedy, race.argmax(dim=-1))


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row beyond its top-p mass (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
