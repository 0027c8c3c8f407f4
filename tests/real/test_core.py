"""The engine core on real weights (SmolLM2-135M-Instruct, CPU, fp32).

SmolLM2's shapes differ from the synthetic models' (9 query heads sharing 3 KV heads,
head dim 64, tied embeddings, RoPE theta 1e5), and its text is checkable: the paged
runner must reproduce HF ``generate`` token for token whatever joins when.
"""

from __future__ import annotations

import pytest

from services.worker.core.engine import CoreConfig, EngineCore
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import LoadedModel
from services.worker.rows import RequestOutcome
from shared.schemas import GenerationRequest, SamplingParams, TokenDelta

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "How do you say 'coffee' in French?",
    "Write a short happy birthday message with emojis.",
]
# K and V, 30 layers, 3 KV heads of 64 dims, fp32: bytes of one token's cache.
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    rendered = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    return list(loaded.tokenizer(rendered, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def mixed(smollm2: LoadedModel) -> list[GenerationRequest]:
    """Raw and chat prompts of 4 to 40 tokens, each with its own budget, EOS ignored."""
    ids = [smollm2.tokenizer(p).input_ids for p in RAW_PROMPTS]
    ids += [chat_ids(smollm2, q) for q in CHAT_PROMPTS]
    return [
        GenerationRequest(
            id=f"r{i}",
            prompt="p",
            prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=8 + 2 * i, temperature=0.0, ignore_eos=True),
        )
        for i, prompt in enumerate(ids)
    ]


@pytest.fixture(scope="module")
def expected(smollm2: LoadedModel, mixed: list[GenerationRequest]) -> dict[str, str]:
    """HF ``generate``, one request at a time: no padding, no joins."""
    engine = HFGenerateEngine(smollm2)
    limits = BatchLimits(max_seq_len=2048, ignore_eos=True)
    return {r.id: engine.run([r], limits).results[0].text for r in mixed}


def drive(
    core: EngineCore, requests: list[GenerationRequest]
) -> tuple[dict[str, RequestOutcome], list[TokenDelta]]:
    """One request joins per step while the core runs."""
    pending, done, deltas = list(requests), {}, []
    while pending or core.has_work:
        if pending:
            core.add(pending.pop(0))
        out = core.step()
        deltas += out.deltas
        done.update({o.request_id: o for o in out.finished})
    return done, deltas


@pytest.mark.parametrize(
    ("kv_tokens", "budget"),
    [(4096, 24), (96, 64)],
    ids=["chunked-prefill", "preempting"],
)
def test_core_equals_hf_generate_token_for_token(
    smollm2: LoadedModel,
    mixed: list[GenerationRequest],
    expected: dict[str, str],
    kv_tokens: int,
    budget: int,
) -> None:
    config = CoreConfig(
        block_size=16,
        max_num_seqs=4,
        max_batched_tokens=budget,
        kv_budget_bytes=kv_tokens * KV_BYTES_PER_TOKEN,
        cuda_graphs=False,
    )
    core = EngineCore(smollm2, config)
    done, _ = drive(core, mixed)
    assert {rid: o.text for rid, o in done.items()} == expected
    assert "Paris" in expected["r0"] and "Paris" in expected["r3"]  # real text was compared
    if kv_tokens < 100:
        assert core.stats().preemptions > 0  # recomputed after eviction, output unchanged


def test_core_chat_stops_at_end_of_turn_and_at_a_stop_string(smollm2: LoadedModel) -> None:
    def ask(rid: str, stop: list[str]) -> GenerationRequest:
        return GenerationRequest(
            id=rid,
            kind="chat",
            prompt="p",
            prompt_token_ids=chat_ids(smollm2, CHAT_PROMPTS[0]),
            params=SamplingParams(max_tokens=40, temperature=0.0, stop=stop),
            stream=True,
        )

    core = EngineCore(smollm2, CoreConfig(block_size=16, max_num_seqs=4, cuda_graphs=False))
    done, deltas = drive(core, [ask("eot", []), ask("stop", ["Paris"])])
    full, stopped = done["eot"], done["stop"]
    assert "Paris" in full.text and full.finish_reason == "stop"  # its own <|im_end|>
    assert full.completion_tokens < 40
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index("Paris")]
    streamed = "".join(d.text for d in deltas if d.request_id == "stop")
    assert stopped.text.startswith(streamed) and "Paris" not in streamed
