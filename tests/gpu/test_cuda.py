"""GPU-only checks, run on the device machine with ``pytest -m gpu tests/gpu``.

CI has no GPU and deselects them (``-m "not gpu"`` in pyproject); the CPU tests cover
the same code through fault injection.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from services.monitor.nvml import TelemetryReader  # noqa: E402
from services.worker.engine import BatchLimits, HFGenerateEngine  # noqa: E402
from services.worker.model import load_model  # noqa: E402
from services.worker.oom import OomInfo, is_oom, run_with_oom_guard  # noqa: E402
from shared.schemas import GenerationRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu
GIB = 1 << 30


def _requests(count: int, prompt_len: int, new_tokens: int) -> list[GenerationRequest]:
    rng = random.Random(0)
    return [
        GenerationRequest(
            id=f"r{i}", prompt="x",
            prompt_token_ids=[1] + [rng.randrange(4, 32000) for _ in range(prompt_len - 1)],
            params=SamplingParams(max_tokens=new_tokens, temperature=0),
        )
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def capped_tinyllama():
    """TinyLlama-shaped model on a GPU whose usable memory is capped near weights + 3 GiB."""
    assert torch.cuda.is_available(), "the gpu tests need CUDA"
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((2.2 * 1e9 + 3 * GIB) / total, 0)
    loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "bf16")
    yield loaded
    torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_real_cuda_oom_is_survived_by_splitting(capped_tinyllama) -> None:
    requests = _requests(96, 1500, 8)
    limits = BatchLimits(max_seq_len=2048, ignore_eos=True)
    # The static configuration: plain HF generate on the whole batch dies of OOM.
    ids = torch.tensor([r.prompt_token_ids for r in requests], device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        capped_tinyllama.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.empty_cache()

    engine = HFGenerateEngine(capped_tinyllama)
    ooms: list[OomInfo] = []
    outcomes = run_with_oom_guard(
        lambda part: engine.run(part, limits), requests, on_oom=ooms.append, on_fail=engine.fail
    )
    results = [r for o in outcomes for r in o.results]
    assert len(results) == 96
    assert all(r.error is None and r.completion_tokens == 8 for r in results)
    assert ooms and all(o.recovered for o in ooms)
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))


def test_nvml_sees_memory_allocated_on_the_gpu() -> None:
    # Blocks cached by earlier tests would serve the allocation without NVML seeing it,
    # and the capped fixture's memory fraction would refuse it.
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()
    reader = TelemetryReader()
    before = reader.read()
    assert before.gpu == "nvml" and before.gpus
    block = torch.ones(4 * GIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = reader.read()
    grown = after.gpus[0].memory_used_bytes - before.gpus[0].memory_used_bytes
    assert grown >= 4 * GIB * 0.9
    assert after.gpus[0].memory_total_bytes > 40 * GIB
    assert after.gpus[0].utilization_pct is not None
    del block
    reader.close()


def test_the_worker_and_the_monitor_name_the_gpu_by_the_same_uuid() -> None:
    """The agent finds a worker's GPU in the monitor's samples by UUID: torch's (what the
    worker reports for cuda:0) must be one NVML lists, visible devices remapped or not."""
    from services.worker.stats import gpu_uuid

    reader = TelemetryReader()
    listed = {g.uuid for g in reader.read().gpus}
    reader.close()
    assert gpu_uuid("cuda:0") in listed and None not in listed
