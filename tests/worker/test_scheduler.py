"""Batch selection: oldest first, similar lengths together, token budget respected."""

from __future__ import annotations

import random

import pytest

from services.worker.scheduler import padded_tokens, padding_ratio, row_cost, select_batch
from shared.schemas import GenerationRequest, SamplingParams


def make(index: int, prompt_len: int, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        id=f"r{index}",
        prompt="x",
        prompt_token_ids=[5] * prompt_len,
        params=SamplingParams(max_tokens=max_tokens),
        enqueued_at=1000.0 + index,
    )


def test_padding_ratio() -> None:
    assert padding_ratio([10, 10, 10]) == 0.0
    assert padding_ratio([2, 8]) == pytest.approx(6 / 16)
    assert padding_ratio([]) == 0.0


def test_empty_queue_gives_empty_batch() -> None:
    assert select_batch([], 8) == []


def test_oldest_always_included_and_batch_size_respected() -> None:
    waiting = [make(i, 10 + 7 * i) for i in range(20)]
    batch = select_batch(waiting, 5)
    assert len(batch) == 5
    assert batch[0].id == "r0"
    # The four others are the closest in length to the oldest: r1..r4.
    assert [r.id for r in batch] == ["r0", "r1", "r2", "r3", "r4"]


def test_mixed_lengths_make_low_padding_batches() -> None:
    rng = random.Random(7)
    waiting = [make(i, rng.choice([rng.randint(20, 40), rng.randint(400, 500)])) for i in range(64)]
    oldest_len = waiting[0].prompt_len
    batch = select_batch(waiting, 16)
    fifo = waiting[:16]
    lengths = [r.prompt_len for r in batch]
    assert waiting[0] in batch
    assert padding_ratio(lengths) < 0.2
    assert padding_ratio([r.prompt_len for r in fifo]) > 0.4  # what FIFO would have done
    # All rows come from the oldest request's length class.
    assert all(abs(n - oldest_len) < 200 for n in lengths)


def test_drains_without_starvation() -> None:
    """Repeated selection serves every request, each batch led by the oldest left."""
    rng = random.Random(3)
    waiting = [make(i, rng.randint(1, 600)) for i in range(50)]
    served: list[str] = []
    while waiting:
        batch = select_batch(waiting, 8, max_batch_tokens=4000)
        assert batch[0] is waiting[0]
        served += [r.id for r in batch]
        waiting = [r for r in waiting if r not in batch]
    assert sorted(served) == sorted(f"r{i}" for i in range(50))


def test_token_budget_respected_with_long_prompts_in_smaller_batches() -> None:
    waiting = [make(i, 500, 100) for i in range(10)] + [make(10 + i, 50, 100) for i in range(10)]
    long_batch = select_batch(waiting, 16, max_batch_tokens=2000)
    assert padded_tokens([row_cost(r) for r in long_batch]) <= 2000
    assert len(long_batch) == 3  # 3 x (500 + 100) = 1800
    short_first = waiting[10:] + waiting[:10]
    short_batch = select_batch(short_first, 16, max_batch_tokens=2000)
    assert len(short_batch) == 10  # 10 x 150 = 1500; one long row would blow the budget
    assert all(r.prompt_len == 50 for r in short_batch)


def test_request_alone_over_budget_still_runs_alone() -> None:
    waiting = [make(0, 3000, 200), make(1, 10), make(2, 12)]
    batch = select_batch(waiting, 8, max_batch_tokens=1000)
    assert [r.id for r in batch] == ["r0"]


def test_budget_skips_a_long_candidate_but_keeps_filling() -> None:
    # r1 is closest to r0 in length but its max_tokens breaks the budget; r2, r3 fit.
    waiting = [make(0, 100, 10), make(1, 101, 900), make(2, 90, 10), make(3, 80, 10)]
    batch = select_batch(waiting, 4, max_batch_tokens=500)
    assert [r.id for r in batch] == ["r0", "r2", "r3"]


def test_row_cost_follows_the_sequence_cap() -> None:
    assert row_cost(make(0, 100, 50)) == (100, 50)
    assert row_cost(make(0, 100, 50), max_seq_len=120) == (100, 20)
    # A prompt over the cap keeps room for min(max_tokens, cap // 4) new tokens.
    assert row_cost(make(0, 400, 50), max_seq_len=128) == (96, 32)
    assert row_cost(make(0, 400, 8), max_seq_len=128) == (120, 8)
