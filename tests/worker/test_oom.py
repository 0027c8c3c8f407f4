"""The OOM guard against the real engine, with OOMs injected through the engine's hook."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import BatchLimits, BatchOutcome, HFGenerateEngine, combine_outcomes
from services.worker.model import LoadedModel
from services.worker.oom import OomInfo, OomInjector, is_oom, run_with_oom_guard
from shared.schemas import GenerationRequest, SamplingParams, TokenDelta

LIMITS = BatchLimits(max_seq_len=512, ignore_eos=True)
SENTENCE = "the model is a long prompt with many words in it and then more"
WORDS = SENTENCE.split()


def batch_of(
    loaded: LoadedModel, n: int, max_tokens: int = 8, **kw: object
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            id=f"r{i}",
            prompt=" ".join(WORDS[: 1 + i]),
            prompt_token_ids=loaded.tokenizer(" ".join(WORDS[: 1 + i])).input_ids,
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
            **kw,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


def guarded(
    engine: HFGenerateEngine,
    reqs: list[GenerationRequest],
    events: list[OomInfo],
    on_text: object = None,
) -> BatchOutcome:
    outcomes = run_with_oom_guard(
        lambda part: engine.run(part, LIMITS, on_text),  # type: ignore[arg-type]
        reqs,
        on_oom=events.append,
        on_fail=engine.fail,
    )
    return combine_outcomes(outcomes, engine.precision)


def test_batch_of_8_with_oom_above_2_rows_completes_by_splitting(loaded: LoadedModel) -> None:
    reqs = batch_of(loaded, 8)
    expected = HFGenerateEngine(loaded).run(reqs, LIMITS)
    injector = OomInjector(max_rows=2)
    events: list[OomInfo] = []
    out = guarded(HFGenerateEngine(loaded, fault=injector), reqs, events)
    assert [r.request_id for r in out.results] == [r.id for r in reqs]
    assert [r.text for r in out.results] == [r.text for r in expected.results]
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in out.results)
    # 8 -> 4+4, then each 4 -> 2+2: three OOMs, all survived.
    assert [e.batch_size for e in events] == [8, 4, 4]
    assert all(e.recovered for e in events)
    assert events[0].max_prompt_len == max(r.prompt_len for r in reqs)
    assert events[0].max_new_tokens == 8
    assert injector.injected == 3


def test_single_request_that_still_ooms_fails_alone(loaded: LoadedModel) -> None:
    reqs = batch_of(loaded, 4, max_tokens=6)
    alone_cost = reqs[3].prompt_len + 6  # the longest request alone is over the bound
    engine = HFGenerateEngine(loaded, fault=OomInjector(max_tokens=alone_cost - 1))
    events: list[OomInfo] = []
    out = guarded(engine, reqs, events)
    by_id = {r.request_id: r for r in out.results}
    assert by_id["r3"].finish_reason == "error"
    assert "out of memory" in str(by_id["r3"].error)
    reference = HFGenerateEngine(loaded).run(reqs[:3], LIMITS).results
    assert [by_id[r.request_id].text for r in reference] == [r.text for r in reference]
    failed = [e for e in events if not e.recovered]
    assert [(e.batch_size, e.max_prompt_len) for e in failed] == [(1, reqs[3].prompt_len)]


def test_oom_mid_decode_resumes_without_repeating_streamed_text(loaded: LoadedModel) -> None:
    reqs = batch_of(loaded, 4, max_tokens=12, stream=True)
    expected = HFGenerateEngine(loaded).run(reqs, LIMITS)
    injector = OomInjector(max_rows=2, at_step=5, times=1)
    deltas: list[TokenDelta] = []
    events: list[OomInfo] = []
    out = guarded(HFGenerateEngine(loaded, fault=injector), reqs, events, deltas.extend)
    assert len(events) == 1 and events[0].batch_size == 4
    assert [r.text for r in out.results] == [r.text for r in expected.results]
    assert all(r.completion_tokens == 12 for r in out.results)
    for result in out.results:
        mine = [d for d in deltas if d.request_id == result.request_id]
        assert "".join(d.text for d in mine) == result.text  # nothing streamed twice
    # Only the tokens after the failure were generated again.
    assert out.tokens_generated == 4 * 12 - 4 * 4


def test_injector_configured_by_setting(loaded: LoadedModel) -> None:
    reqs = batch_of(loaded, 6, max_tokens=4)
    width = max(r.prompt_len for r in reqs)
    engine = HFGenerateEngine(loaded, inject_oom_above_tokens=3 * (width + 4))
    events: list[OomInfo] = []
    out = guarded(engine, reqs, events)
    assert all(r.finish_reason == "length" for r in out.results)
    assert events and events[0].batch_size == 6


def test_runtime_error_out_of_memory_is_oom_and_others_propagate() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("HIP out of memory. Tried to allocate 2 GiB"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))

    def broken(batch: list[GenerationRequest]) -> int:
        raise RuntimeError("shape mismatch")

    req = GenerationRequest(id="x", prompt="x", prompt_token_ids=[1])
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_guard(broken, [req], on_oom=lambda info: None)


def test_default_failure_outcome_is_an_error_result() -> None:
    def always_oom(batch: list[GenerationRequest]) -> BatchOutcome:
        raise RuntimeError("CUDA error: out of memory")

    reqs = [GenerationRequest(id=f"x{i}", prompt="x", prompt_token_ids=[1, 2]) for i in range(3)]
    events: list[OomInfo] = []
    outcomes = run_with_oom_guard(always_oom, reqs, on_oom=events.append)
    results = [r for o in outcomes for r in o.results]
    assert [r.request_id for r in results] == ["x0", "x1", "x2"]
    assert all(r.finish_reason == "error" for r in results)
    # 3 -> 2+1; 2 -> 1+1; three single requests fail.
    assert [e.recovered for e in events].count(False) == 3
    assert run_with_oom_guard(always_oom, [], on_oom=events.append) == []
