"""The engine on real weights (SmolLM2-135M-Instruct, CPU, fp32): answers, chat template
as the gateway renders it, stop strings and streaming on text the model really writes.

Random weights can't catch a wrong attention mask or chat template (any noise passes);
a real model answering a factual question can.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.gateway.catalog import parse_model
from services.gateway.config import GatewaySettings
from services.gateway.planning import plan_chat
from services.gateway.schemas import ChatRequest
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import LoadedModel, model_info
from services.worker.packaged import PACKAGED_MODEL
from services.worker.rows import RequestOutcome
from shared.schemas import GenerationRequest, SamplingParams, TokenDelta, dump

LIMITS = BatchLimits(max_seq_len=2048)
CAPITAL = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine(smollm2: LoadedModel) -> HFGenerateEngine:
    return HFGenerateEngine(smollm2)


def chat_request(
    loaded: LoadedModel, rid: str, question: str, max_tokens: int = 40, **params: object
) -> GenerationRequest:
    """A greedy, streaming chat request, its prompt rendered by the model's own template."""
    messages = [{"role": "user", "content": question}]
    rendered = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    ids = loaded.tokenizer(rendered, add_special_tokens=False).input_ids
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        id=rid,
        kind="chat",
        prompt=rendered,
        prompt_token_ids=ids,
        params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        stream=True,
    )


def run_streaming(
    engine: HFGenerateEngine, request: GenerationRequest
) -> tuple[RequestOutcome, list[TokenDelta]]:
    deltas: list[TokenDelta] = []
    outcome = engine.run([request], LIMITS, on_text=deltas.extend).results[0]
    return outcome, deltas


def test_packaged_model_is_the_real_smollm2(smollm2: LoadedModel) -> None:
    config = smollm2.model.config
    shape = (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
    )
    assert shape == (30, 9, 3, 576)
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert (smollm2.name, smollm2.synthetic, smollm2.fallback_for) == (PACKAGED_MODEL, False, None)
    assert smollm2.context_length == config.max_position_embeddings == 8192
    assert smollm2.tokenizer.decode(smollm2.eos_token_ids) == "<|im_end|>"


def test_greedy_chat_answers_the_capital_of_france(
    smollm2: LoadedModel, engine: HFGenerateEngine
) -> None:
    outcome = engine.run([chat_request(smollm2, "paris", CAPITAL)], LIMITS).results[0]
    assert "Paris" in outcome.text
    assert outcome.finish_reason == "stop"  # the model's own end of turn, not the budget
    assert outcome.completion_tokens < 40


def test_chat_rendered_by_the_gateway_gets_a_real_answer(
    smollm2: LoadedModel, engine: HFGenerateEngine
) -> None:
    served = parse_model(dump(model_info(smollm2)))
    body = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": CAPITAL}], "temperature": 0, "max_tokens": 40}
    )
    plan = plan_chat(body, served, GatewaySettings())
    [request] = plan.requests
    # The gateway renders and tokenizes without torch exactly as transformers does.
    assert request.prompt_token_ids == chat_request(smollm2, "ref", CAPITAL).prompt_token_ids
    assert request.prompt.startswith("<|im_start|>system\n")  # SmolLM2's template, not ours
    outcome = engine.run(plan.requests, LIMITS).results[0]
    assert "Paris" in outcome.text and outcome.finish_reason == "stop"


def test_a_stop_string_the_model_writes_ends_the_answer(
    smollm2: LoadedModel, engine: HFGenerateEngine
) -> None:
    full, _ = run_streaming(engine, chat_request(smollm2, "full", CAPITAL))
    assert "Paris" in full.text
    stopped, deltas = run_streaming(
        engine, chat_request(smollm2, "stop", CAPITAL, stop=["@@never@@", "Paris"])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index("Paris")]
    assert stopped.completion_tokens < full.completion_tokens
    assert "".join(d.text for d in deltas) == stopped.text  # the stop string never streamed


@pytest.mark.parametrize(
    ("question", "max_tokens"),
    [
        ("How do you say 'coffee' in French?", 40),  # accented letters: two UTF-8 bytes
        ("Write a short happy birthday message with emojis.", 39),  # four bytes, split tokens
    ],
)
def test_streamed_deltas_join_to_the_final_text_with_multibyte_characters(
    smollm2: LoadedModel, engine: HFGenerateEngine, question: str, max_tokens: int
) -> None:
    outcome, deltas = run_streaming(engine, chat_request(smollm2, "mb", question, max_tokens))
    text = outcome.text
    assert any(ord(ch) > 127 for ch in text), text
    assert "".join(d.text for d in deltas) == text
    assert len(deltas) > 1
    # A character split across tokens is held back until complete, never streamed broken.
    assert "\ufffd" not in text


PARITY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):",
    "Water boils at",
]


def test_greedy_batch_equals_hf_generate_token_for_token(
    smollm2: LoadedModel, engine: HFGenerateEngine
) -> None:
    tokenizer = smollm2.tokenizer
    requests = [
        GenerationRequest(
            id=f"p{i}",
            prompt=text,
            prompt_token_ids=tokenizer(text).input_ids,
            params=SamplingParams(max_tokens=6 + 2 * i, temperature=0.0, ignore_eos=True),
        )
        for i, text in enumerate(PARITY_PROMPTS)
    ]
    batch = engine.run(requests, LIMITS).results  # padded to the longest prompt, in one batch
    model: Any = smollm2.model  # generate() is untyped in transformers
    for request, outcome in zip(requests, batch, strict=True):
        ids = torch.tensor([request.prompt_token_ids])
        with torch.inference_mode():
            alone = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=request.params.max_tokens,
                min_new_tokens=request.params.max_tokens,
                pad_token_id=smollm2.pad_token_id,
            )[0, ids.shape[1] :]
        assert outcome.completion_tokens == len(alone) == request.params.max_tokens
        assert outcome.text == tokenizer.decode(alone), request.prompt
