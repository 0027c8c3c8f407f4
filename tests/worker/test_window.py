"""A window of engine steps as one cycle record: the shape of what ran, not only what ended."""

from __future__ import annotations

from services.worker.core.engine import CoreConfig, EngineCore
from services.worker.model import LoadedModel
from services.worker.window import StepWindow, WindowContext
from shared.schemas import ControlSettings, GenerationRequest, SamplingParams


def test_a_window_describes_the_sequences_that_ran(tiny: LoadedModel) -> None:
    tiny.model.float()
    tiny.precision = "fp32"
    core = EngineCore(tiny, CoreConfig(block_size=4, kv_budget_bytes=1 << 20, ignore_eos=True))
    requests = {
        "long": GenerationRequest(id="long", prompt="p", prompt_token_ids=[1] + [9] * 39,
                                  params=SamplingParams(max_tokens=30, temperature=0)),
        "short": GenerationRequest(id="short", prompt="p", prompt_token_ids=[1, 5, 6],
                                   params=SamplingParams(max_tokens=2, temperature=0)),
    }  # fmt: skip
    for request in requests.values():
        core.add(request)
    window = StepWindow(interval_s=0.0)
    outputs = [core.step() for _ in range(3)]
    for out in outputs:
        window.add(out, requests)
    settings = ControlSettings(version=3, batch_size=8, max_seq_len=512, precision="fp32")
    cycle = window.flush(core.stats(), WindowContext("w", "cpu", settings, queue_depth=4))
    assert cycle.max_prompt_len == 40 and cycle.max_new_tokens == 30  # "long" still runs
    assert cycle.batch_size == 2 and cycle.requests_finished == 1  # "short" ended
    assert cycle.tokens_generated == sum(o.stats.sampled for o in outputs) > 2
    assert cycle.prefill_tokens == 43 and cycle.steps == 3
    assert cycle.kv_blocks_used == core.stats().kv_blocks_used > 0
    assert cycle.settings_version == 3 and cycle.queue_depth == 4 and cycle.ttft_p50_s is not None
    assert window.steps == 0 and window.tokens == 0  # the next window starts empty
