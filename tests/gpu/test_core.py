"""The engine core on a GPU (``pytest -m gpu tests/gpu``; deselected in CI): CUDA graphs and
the Triton kernel give the CPU path's greedy output, and a live shrink of the KV pool gives
its memory back to the driver."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from services.worker.core.engine import CoreConfig, EngineCore  # noqa: E402
from services.worker.model import load_model  # noqa: E402
from shared.schemas import GenerationRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu
GIB = 1 << 30


def _requests(count: int) -> list[GenerationRequest]:
    rng = random.Random(3)
    return [
        GenerationRequest(
            id=f"r{i}", prompt="x",
            prompt_token_ids=[1] + [rng.randrange(4, 32000) for _ in range(rng.randint(8, 300))],
            params=SamplingParams(max_tokens=rng.randint(8, 64), temperature=0, ignore_eos=True),
        )
        for i in range(count)
    ]  # fmt: skip


def _run(core: EngineCore, requests: list[GenerationRequest]) -> dict[str, str]:
    for request in requests:
        core.add(request)
    done: dict[str, str] = {}
    while core.has_work:
        done.update({o.request_id: o.text for o in core.step().finished})
    return done


def test_graphs_and_kernel_give_the_eager_gather_output_in_fp32() -> None:
    loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "fp32", False)
    requests = _requests(24)
    fast = _run(EngineCore(loaded, CoreConfig(kv_budget_bytes=2 * GIB, ignore_eos=True)), requests)
    plain = CoreConfig(kv_budget_bytes=2 * GIB, ignore_eos=True, cuda_graphs=False,
                       paged_kernel=False, decode_steps=1)  # fmt: skip
    assert fast == _run(EngineCore(loaded, plain), requests)


def test_a_live_shrink_returns_memory_to_the_driver_and_loses_nothing() -> None:
    loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "bf16", False)
    core = EngineCore(loaded, CoreConfig(kv_budget_bytes=8 * GIB, ignore_eos=True))
    for request in _requests(32):
        core.add(request)
    core.step()
    before, _ = torch.cuda.mem_get_info()
    report = core.resize_kv(2 * GIB)
    after, _ = torch.cuda.mem_get_info()
    assert after - before > 5 * GIB  # the driver (NVML) sees it free
    assert report.preempted == 0 and report.seconds < 1.0
    done = 0
    while core.has_work:
        done += len(core.step().finished)
    assert done == 32 and core.stats().kv_blocks_used == 0


def test_a_pool_sized_beside_another_process_may_grow_to_the_worker_s_share() -> None:
    """Started while another process holds most of the card (a second worker on a shared
    GPU), the pool is small, but requests are judged against what it may grow to once
    the agent gives it an even share: the worker's share of the card less its weights
    and activation peak, not the small pool it started with."""
    loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "bf16", False)
    free, total = torch.cuda.mem_get_info()
    held = torch.empty(free - 12 * GIB, dtype=torch.uint8, device="cuda")
    core = EngineCore(loaded, CoreConfig(ignore_eos=True, gpu_memory_fraction=0.9))
    memory = core.runner.memory
    assert memory is not None and memory.kv_bytes < 12 * GIB
    block_bytes = memory.kv_bytes // memory.num_blocks
    share = 0.9 * total - memory.weights - memory.activation_peak
    assert abs(memory.capacity_blocks * block_bytes - share) < 2 * block_bytes
    assert core._capacity() == memory.capacity_blocks > memory.num_blocks
    del held


def test_graphs_captured_after_a_shrink_write_inside_the_smaller_pool() -> None:
    """A warm-up after a live shrink (a run's settings applied before its clock) captures
    every graph: its inputs must be padding, not the last step's slots and block tables,
    which pointed into the larger pool (an illegal memory access on the H200 before)."""
    loaded = load_model("synthetic:tinyllama-1.1b", "cuda", "bf16", False)
    core = EngineCore(loaded, CoreConfig(kv_budget_bytes=8 * GIB, ignore_eos=True))
    requests = _requests(32)
    for request in requests[:16]:
        core.add(request)
    while core.has_work:
        core.step()  # the static buffers now hold slots from across the 8 GiB pool
    core.resize_kv(GIB // 4)
    assert core.warm_up() > 0
    torch.cuda.synchronize()
    assert len(_run(core, requests[16:])) == 16
