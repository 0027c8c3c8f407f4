"""The benchmark runner drives the worker's serving loop: its settings before its clock."""

from __future__ import annotations

from experiments.runner import AegisRunner
from services.worker.__main__ import build_core
from services.worker.config import WorkerSettings
from services.worker.model import LoadedModel
from shared.schemas import ControlSettings, GenerationRequest, SamplingParams


def test_a_run_applies_its_settings_and_captures_graphs_before_the_first_step(
    tiny: LoadedModel,
) -> None:
    start = WorkerSettings(model="synthetic:tiny", device="cpu", batch_size=4,
                           kv_budget_bytes=1 << 20)  # fmt: skip
    core = build_core(tiny, start)
    events: list[str] = []
    warm_up, step = core.warm_up, core.step

    def spy_warm_up() -> int:
        events.append("warm_up")
        return warm_up()

    def spy_step():  # type: ignore[no-untyped-def]
        events.append("step")
        return step()

    core.warm_up, core.step = spy_warm_up, spy_step  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(id=f"r{i}", prompt="", prompt_token_ids=[1, 5, 6], params=params)
                for i in range(3)]  # fmt: skip
    run = ControlSettings(batch_size=2, max_seq_len=64, precision="fp32", kv_budget_bytes=1 << 19)
    result, _ = AegisRunner(core, "cpu").run(requests, run)
    assert result.completed == 3 and result.tokens == 9
    assert events[0] == "warm_up" and events.count("warm_up") == 1 and "step" in events
    assert core.limits.max_num_seqs == 2 and core.stats().kv_bytes <= 1 << 19


def test_latencies_count_from_each_request_s_arrival(tiny: LoadedModel) -> None:
    """A request's time to first token and end-to-end latency count from its own arrival,
    not from the run's start (on an H200 a loop change once made every TTFT count from
    the start: p50 7.4 s in a 15 s run whose answers came within a second)."""
    settings = WorkerSettings(model="synthetic:tiny", device="cpu", batch_size=4,
                              kv_budget_bytes=1 << 20)  # fmt: skip
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(id=f"r{i}", prompt="", prompt_token_ids=[1, 5, 6], params=params)
                for i in range(3)]  # fmt: skip
    arrivals = [0.0, 0.05, 0.1]
    run = ControlSettings(batch_size=4, max_seq_len=64, precision="fp32")
    result, _ = AegisRunner(build_core(tiny, settings), "cpu").run(
        requests, run, arrivals=arrivals, keep_timings=True
    )
    timings = result.extra["timings"]
    assert [round(t["arrived"], 6) for t in timings] == arrivals
    assert all(t["first_token"] >= t["arrived"] for t in timings)
