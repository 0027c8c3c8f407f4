"""The fallback for architectures the engine core does not run: a tiny GPT-2 saved to a
local folder, loaded through the real loading path, served through the same loop."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.worker.__main__ import build_core
from services.worker.batch_core import BatchEngineCore
from services.worker.config import WorkerSettings
from services.worker.core.engine import StepOutput
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import LoadedModel, load_model
from shared.schemas import ControlSettings, GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def gpt2(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)  # a byte-level BPE of 512 ids
    return load_model(str(folder), "cpu", "fp32", allow_synthetic_fallback=False)


def request(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerationRequest(id=rid, prompt="p", prompt_token_ids=prompt, params=params)


def test_an_unsupported_architecture_is_served_by_whole_batches(gpt2: LoadedModel) -> None:
    settings = WorkerSettings(worker_id="w-gpt2", model="x", device="cpu", batch_size=2)
    core = build_core(gpt2, settings)
    assert isinstance(core, BatchEngineCore)
    requests = [request(f"r{i}", [1, 5 + i, 9, 40 + i], 6 + i) for i in range(3)]
    for r in requests:
        core.add(r)
    core.add(request("long", [1] * 100, 60))  # 160 > the model's 128 positions
    core.add(request("gone", [1, 2, 3], 4))
    assert core.abort("gone") and not core.abort("nope")
    outputs: list[StepOutput] = []
    while core.has_work:
        outputs.append(core.step())
    done = {o.request_id: o for out in outputs for o in out.finished}
    assert set(done) == {"r0", "r1", "r2", "long", "gone"}
    assert done["long"].finish_reason == "error" and "context length 128" in str(done["long"].error)
    assert done["gone"].finish_reason == "cancelled"
    alone = HFGenerateEngine(gpt2)
    limits = BatchLimits(max_seq_len=128, ignore_eos=True)
    for r in requests:
        assert done[r.id].text == alone.run([r], limits).results[0].text
        assert done[r.id].completion_tokens == r.params.max_tokens  # never cut
    assert max(out.stats.running for out in outputs) == 2  # batches of batch_size
    assert sum(out.stats.sampled for out in outputs) == 6 + 7 + 8


def test_the_fallback_waits_for_max_seq_len_and_applies_settings(gpt2: LoadedModel) -> None:
    core = build_core(gpt2, WorkerSettings(worker_id="w", model="x", device="cpu"))
    core.apply(ControlSettings(batch_size=4, max_seq_len=16, precision="fp32"))
    core.add(request("big", [1] * 20, 4))
    for _ in range(3):
        assert not core.step().finished  # waits: 24 > 16, never cut
    core.apply(ControlSettings(version=2, batch_size=4, max_seq_len=64, precision="fp32"))
    assert core.step().finished[0].completion_tokens == 4
