"""The HF generate engine on CPU with ``synthetic:tiny``: per-row behaviour in one batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.worker.engine import (
    BatchLimits,
    HFGenerateEngine,
    RequestOutcome,
    combine_outcomes,
    plan_row,
)
from services.worker.model import LoadedModel, load_model
from shared.schemas import GenerationRequest, SamplingParams, TokenDelta

LIMITS = BatchLimits(max_seq_len=512, ignore_eos=True)
PROMPTS = [
    "hello",
    "the model is a long prompt with many words in it, and then some more words",
    "what time is it",
    "a",
]


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> HFGenerateEngine:
    return HFGenerateEngine(loaded)


def request(
    loaded: LoadedModel,
    rid: str,
    text: str,
    max_tokens: int = 12,
    stream: bool = False,
    **params: object,
) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        id=rid,
        prompt=text,
        prompt_token_ids=loaded.tokenizer(text).input_ids,
        params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        stream=stream,
    )


def texts(results: list[RequestOutcome]) -> list[str]:
    return [r.text for r in results]


def test_batch_matches_each_request_alone(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    reqs = [request(loaded, f"r{i}", p, max_tokens=10) for i, p in enumerate(PROMPTS)]
    batch = engine.run(reqs, LIMITS)
    alone = [engine.run([r], LIMITS).results[0] for r in reqs]
    assert [r.request_id for r in batch.results] == ["r0", "r1", "r2", "r3"]
    assert texts(batch.results) == texts(alone)
    assert all(r.text for r in batch.results)


def test_per_request_max_tokens_and_counts(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    budgets = [3, 9, 1, 6]
    reqs = [
        request(loaded, f"m{i}", p, n)
        for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    out = engine.run(reqs, LIMITS)
    assert [r.completion_tokens for r in out.results] == budgets
    assert all(r.finish_reason == "length" for r in out.results)
    assert [r.prompt_tokens for r in out.results] == [r.prompt_len for r in reqs]
    assert out.tokens_generated == sum(budgets)
    assert out.max_new_tokens == 9
    for r in out.results:
        assert r.first_token_at is not None
        assert r.started_at <= r.first_token_at <= r.finished_at
    # A shorter budget yields a prefix of the same greedy continuation.
    longer = engine.run([request(loaded, "x", PROMPTS[1], 20)], LIMITS).results[0].text
    assert longer.startswith(out.results[1].text)


def test_padding_ratio_and_prompt_stats(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    reqs = [request(loaded, f"p{i}", p, 2) for i, p in enumerate(PROMPTS)]
    lengths = [r.prompt_len for r in reqs]
    out = engine.run(reqs, LIMITS)
    width = max(lengths)
    assert out.max_prompt_len == width
    assert out.mean_prompt_len == pytest.approx(sum(lengths) / len(lengths))
    assert out.padding_ratio == pytest.approx(sum(width - n for n in lengths) / (width * 4))
    assert out.memory_peak_bytes is None  # CPU
    assert out.precision == "fp32"


def test_greedy_is_deterministic(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    reqs = [request(loaded, f"g{i}", p, 15) for i, p in enumerate(PROMPTS[:2])]
    assert texts(engine.run(reqs, LIMITS).results) == texts(engine.run(reqs, LIMITS).results)


def test_sampling_is_per_row(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    greedy = request(loaded, "greedy", PROMPTS[0], 15)
    seeded = request(loaded, "s1", PROMPTS[2], 15, temperature=1.0, seed=11)
    other_seed = request(loaded, "s2", PROMPTS[2], 15, temperature=1.0, seed=12)
    tiny_p = request(loaded, "p", PROMPTS[1], 15, temperature=1.5, top_p=1e-6, seed=3)
    out = engine.run([greedy, seeded, other_seed, tiny_p], LIMITS)
    greedy_alone = engine.run([greedy], LIMITS).results[0].text
    seeded_alone = engine.run(
        [request(loaded, "s1", PROMPTS[2], 15, temperature=1.0, seed=11)], LIMITS
    )
    assert out.results[0].text == greedy_alone  # a greedy row ignores its neighbours' sampling
    assert out.results[1].text == seeded_alone.results[0].text  # seeded rows reproduce
    assert out.results[1].text != out.results[2].text  # and depend on their seed
    greedy_p = engine.run([request(loaded, "p", PROMPTS[1], 15)], LIMITS).results[0].text
    assert out.results[3].text == greedy_p  # top_p this small keeps only the top token


def test_stop_string_stops_and_is_stripped(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    full = engine.run([request(loaded, "f", PROMPTS[1], 30)], LIMITS).results[0].text
    start = next(i for i in range(3, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    deltas: list[TokenDelta] = []
    stopped = request(loaded, "st", PROMPTS[1], 30, stream=True, stop=["@@never@@", stop])
    out = engine.run([stopped], LIMITS, on_text=deltas.extend).results[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert stop not in out.text
    assert out.completion_tokens < 30
    assert "".join(d.text for d in deltas) == out.text  # the stop string was never streamed


def test_eos_finishes_with_stop(loaded: LoadedModel) -> None:
    req = request(loaded, "e", PROMPTS[2], 10)
    plain = HFGenerateEngine(loaded).run([req], LIMITS).results[0]
    first_token = loaded.tokenizer(plain.text, add_special_tokens=False).input_ids[0]
    eos_model = dataclasses.replace(loaded, eos_token_ids=[first_token])
    out = HFGenerateEngine(eos_model).run([req], BatchLimits(max_seq_len=512))
    assert out.results[0].finish_reason == "stop"
    assert out.results[0].completion_tokens == 1
    assert out.results[0].text == ""
    ignored = HFGenerateEngine(eos_model).run([req], LIMITS).results[0]
    assert ignored.finish_reason == "length" and ignored.completion_tokens == 10
    # Per request: one row ignores EOS, its neighbour in the same batch stops at it.
    own = req.model_copy(update={"id": "own", "params": req.params.model_copy(
        update={"ignore_eos": True})})  # fmt: skip
    mixed = HFGenerateEngine(eos_model).run([req, own], BatchLimits(max_seq_len=512)).results
    assert [(r.finish_reason, r.completion_tokens) for r in mixed] == [("stop", 1), ("length", 10)]


def test_streaming_deltas_concatenate_to_final_text(
    loaded: LoadedModel, engine: HFGenerateEngine
) -> None:
    reqs = [
        request(loaded, "a", PROMPTS[0], 25, stream=True),
        request(loaded, "b", PROMPTS[1], 8, stream=False),
        request(loaded, "c", PROMPTS[3], 40, stream=True, temperature=0.8, seed=5),
    ]
    calls: list[list[TokenDelta]] = []
    out = engine.run(reqs, LIMITS, on_text=calls.append)
    assert len(calls) > 10  # once per decode step, not once at the end
    for result in out.results:
        mine = [d for call in calls for d in call if d.request_id == result.request_id]
        if result.request_id == "b":
            assert mine == []
            continue
        assert "".join(d.text for d in mine) == result.text
        offsets = [d.offset for d in mine]
        assert offsets == [sum(len(d.text) for d in mine[:i]) for i in range(len(mine))]


def test_failing_on_text_does_not_stop_the_batch(
    loaded: LoadedModel, engine: HFGenerateEngine
) -> None:
    def broken(deltas: list[TokenDelta]) -> None:
        raise ConnectionError("redis is down")

    req = request(loaded, "a", PROMPTS[0], 6, stream=True)
    out = engine.run([req], LIMITS, on_text=broken)
    assert out.results[0].completion_tokens == 6
    assert out.results[0].text == engine.run([req], LIMITS).results[0].text


def test_max_seq_len_caps_new_tokens_with_a_note(
    loaded: LoadedModel, engine: HFGenerateEngine
) -> None:
    req = request(loaded, "cap", PROMPTS[1], 50)
    cap = req.prompt_len + 7
    out = engine.run([req], BatchLimits(max_seq_len=cap, ignore_eos=True)).results[0]
    assert out.completion_tokens == 7
    assert out.finish_reason == "length"
    assert out.note is not None and "max_seq_len" in out.note and "50 -> 7" in out.note


def test_long_prompt_truncated_from_the_left(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    req = request(loaded, "long", " ".join(["words"] * 60), 4)
    assert req.prompt_len > 40
    out = engine.run([req], BatchLimits(max_seq_len=32, ignore_eos=True)).results[0]
    assert out.prompt_tokens == 28  # room left for the 4 new tokens
    assert out.completion_tokens == 4
    assert out.note is not None and "truncated" in out.note
    ids = req.prompt_token_ids
    kept = [ids[0], *ids[-27:]]  # BOS kept, then the tail
    manual = req.model_copy(update={"id": "manual", "prompt_token_ids": kept})
    assert out.text == engine.run([manual], LIMITS).results[0].text


def test_plan_row_rules() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        BatchLimits(max_seq_len=1)
    assert plan_row([1, 5, 6], 10, 100, 1).note is None
    plan = plan_row([1, *range(10, 110)], 50, 64, bos_id=1)
    assert plan.prompt_ids[0] == 1 and len(plan.prompt_ids) == 48  # 64 - min(50, 16)
    assert plan.prompt_ids[1:] == list(range(63, 110))
    assert plan.max_new_tokens == 16


def test_bad_requests_fail_alone(loaded: LoadedModel, engine: HFGenerateEngine) -> None:
    good = request(loaded, "ok", PROMPTS[0], 5)
    empty = good.model_copy(update={"id": "empty", "prompt_token_ids": []})
    outside = good.model_copy(update={"id": "oov", "prompt_token_ids": [1, 99999]})
    out = engine.run([empty, good, outside], LIMITS)
    by_id = {r.request_id: r for r in out.results}
    assert by_id["empty"].finish_reason == "error" and "empty prompt" in str(by_id["empty"].error)
    assert by_id["oov"].finish_reason == "error" and "99999" in str(by_id["oov"].error)
    assert by_id["ok"].completion_tokens == 5
    assert by_id["ok"].text == engine.run([good], LIMITS).results[0].text
    assert engine.run([], LIMITS).results == []


def test_combine_outcomes_keeps_order_and_padding(
    loaded: LoadedModel, engine: HFGenerateEngine
) -> None:
    reqs = [request(loaded, f"c{i}", p, 3) for i, p in enumerate(PROMPTS)]
    first, second = engine.run(reqs[:2], LIMITS), engine.run(reqs[2:], LIMITS)
    both = combine_outcomes([first, second], "fp32")
    assert [r.request_id for r in both.results] == ["c0", "c1", "c2", "c3"]
    assert both.tokens_generated == 12
    pad = first.pad_tokens + second.pad_tokens
    assert both.padding_ratio == pytest.approx(pad / (first.padded_tokens + second.padded_tokens))
    assert both.max_prompt_len == max(first.max_prompt_len, second.max_prompt_len)
    assert both.latency_s == pytest.approx(first.latency_s + second.latency_s)


def test_bf16_engine_generates(loaded: LoadedModel) -> None:
    model = load_model("synthetic:tiny", "cpu", "bf16")
    out = HFGenerateEngine(model).run([request(model, "b", PROMPTS[1], 6)], LIMITS)
    assert out.precision == "bf16"
    assert out.results[0].completion_tokens == 6
    assert next(model.model.parameters()).dtype == torch.bfloat16
