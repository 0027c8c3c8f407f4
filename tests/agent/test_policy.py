"""The policy on synthetic traces from a simulated worker (see ``sim.py``)."""

from __future__ import annotations

import random

import pytest

from services.agent.policy import (
    AgentPolicy,
    MemoryView,
    Observation,
    PolicyConfig,
    memory_view,
)
from shared.schemas import CycleStats, DecisionAction, GpuSample, OomEvent
from tests.agent.sim import GIB, OVERHEAD, SimWorker, Trace, drive, new_state, step


def test_memory_ramp_grows_then_stops_below_high_watermark() -> None:
    policy, state, sim = AgentPolicy(), new_state(batch=4), SimWorker()
    trace = drive(policy, state, sim, 300)
    assert set(trace.actions()) == {DecisionAction.GROW}
    assert sim.ooms == []
    assert max(trace.pressures) < 0.85
    assert trace.pressures[-1] > 0.60  # it used the memory it had
    assert state.settings.batch_size > 100
    last_change = trace.decisions[-1][0]
    assert last_change < 150  # then it stays put
    first = trace.decisions[0][1]
    assert first.after.reason == first.reason and "memory" in first.reason
    assert first.inputs["memory_pct"] is not None


def test_neighbour_allocation_shrinks_at_once_even_in_cooldown() -> None:
    policy, state, sim = AgentPolicy(), new_state(batch=4), SimWorker()
    trace = drive(policy, state, sim, 100)
    settled = state.settings.batch_size
    # A change just happened; cooldown is in force for both directions.
    state.adopt(state.settings.model_copy(update={"version": state.settings.version + 1}), 100.0)
    sim.other = 6 * GIB
    # Telemetry shows the neighbour before the worker's next batch runs.
    decision = policy.decide(state, Observation(100.5, sim.view()))
    assert decision is not None
    assert decision.action == DecisionAction.SHRINK
    assert "other processes" in decision.reason
    assert decision.after.batch_size < settled
    assert sim.fits(decision.after.batch_size, sim.prompt_len + sim.new_tokens, "bf16")
    drive(policy, state, sim, 100, start=101.0, trace=trace)
    assert sim.ooms == []
    assert max(trace.pressures[-50:]) < 0.85


def test_a_neighbour_holding_most_of_the_card_is_not_this_workers_pressure() -> None:
    # Another process already holds 70 of 80 GiB when the worker starts: the worker still
    # grows into the 10 GiB left to it, and stops below the high watermark of that room.
    policy, state = AgentPolicy(), new_state(batch=4)
    sim = SimWorker(total=80 * GIB)
    sim.other = 70 * GIB
    trace = drive(policy, state, sim, 300)
    assert set(trace.actions()) == {DecisionAction.GROW}
    assert state.settings.batch_size > 4
    assert sim.ooms == []
    assert max(trace.pressures) < 0.85


def test_oom_storm_halves_remembers_shape_and_settles() -> None:
    # The prior badly underestimates this model: the first big batch OOMs.
    sim = SimWorker(total=12 * GIB)
    sim.true = sim.true.__class__(2.2e9, 90_000.0, 256_000.0)
    policy, state = AgentPolicy(), new_state(batch=128)
    trace = drive(policy, state, sim, 400)
    seq = sim.prompt_len + sim.new_tokens
    assert sim.ooms and sim.ooms[0] == (128, seq)
    halves = [d for _, d in trace.decisions if d.action == DecisionAction.HALVE]
    assert halves[0].after.batch_size == 64
    assert (128, seq) in state.oom_shapes
    # Never back at an OOMed shape or larger at that length.
    for oom_batch, _ in state.oom_shapes:
        first_oom = trace.batches.index(oom_batch) if oom_batch in trace.batches else 0
        assert all(b < oom_batch for b in trace.batches[first_oom + 1 :])
    assert len(sim.ooms) <= 3
    assert len(trace.decisions) <= 8
    assert all(t < 200 for t, _ in trace.decisions)  # settled, no oscillation


def test_oom_burst_of_one_batch_halves_once() -> None:
    policy, state = AgentPolicy(), new_state(batch=64)
    version = state.settings.version

    def oom(batch: int, v: int) -> OomEvent:
        return OomEvent(
            worker_id="w1", batch_size=batch, max_prompt_len=900, max_new_tokens=100,
            precision="bf16", settings_version=v, recovered=True, action="split",
        )  # fmt: skip

    # The worker's guard split 64 -> 32 -> 16; two OOMs of the same settings arrive at once.
    decision = policy.decide(
        state, Observation(10.0, None, (), [oom(64, version), oom(32, version)])
    )
    assert decision is not None and decision.action == DecisionAction.HALVE
    assert decision.after.batch_size == 16
    # A late OOM of the old settings at a batch larger than now: remembered, no new halve.
    assert policy.decide(state, Observation(11.0, None, (), [oom(48, version)])) is None
    assert (48, 1000) in state.oom_shapes and state.settings.batch_size == 16


def test_shift_to_long_prompts_shrinks_before_any_oom() -> None:
    sim = SimWorker(prompt_len=150, new_tokens=100)
    policy, state = AgentPolicy(), new_state(batch=8)
    trace = drive(policy, state, sim, 150)
    short_batch = state.settings.batch_size
    assert short_batch >= 128
    sim.prompt_len = 1800
    # A few long prompts arrive first (a part-full batch), then full batches of them.
    decision = step(policy, state, sim, 150.0, trace, batch=4)
    assert decision is not None and decision.action == DecisionAction.SHRINK
    assert "predicted" in decision.reason
    drive(policy, state, sim, 100, start=151.0, trace=trace)
    assert sim.ooms == []
    assert state.settings.batch_size < short_batch
    assert max(trace.pressures[-50:]) < 0.85


def test_length_capped_when_even_one_sequence_does_not_fit() -> None:
    # 3.2 GiB card: weights and a 2048-token sequence at batch 1 leave no room.
    sim = SimWorker(total=int(3.2 * GIB), prompt_len=1900, new_tokens=100)
    sim.true = sim.true.__class__(2.2e9, 200_000.0, 256_000.0)
    policy, state = AgentPolicy(), new_state(batch=1)
    trace = drive(policy, state, sim, 60)
    caps = [d for _, d in trace.decisions if d.action == DecisionAction.CAP_SEQ]
    assert caps and caps[0].after.max_seq_len < 2048
    assert sim.fits(1, state.settings.max_seq_len, "bf16")


@pytest.mark.parametrize(
    ("queue_depth", "batches"),
    [(0, [16, 32, 64, 32]),  # no backlog: hill climbing doubles
     (1000, [32, 128, 32])],  # a deep backlog: strides of 4x, then back to the best
)  # fmt: skip
def test_throughput_plateau_backs_off_to_best_batch(queue_depth: int, batches: list[int]) -> None:
    def flat_after_32(batch: int) -> float:
        return 100.0 * min(batch, 32) * (0.97 if batch > 32 else 1.0)

    sim = SimWorker(total=80 * GIB, prompt_len=200, new_tokens=100, tps=flat_after_32)
    sim.queue_depth = queue_depth
    policy, state = AgentPolicy(), new_state(batch=8)
    trace = drive(policy, state, sim, 200)
    assert [d.after.batch_size for _, d in trace.decisions] == batches
    back = trace.decisions[-1][1]
    assert back.action == DecisionAction.SHRINK
    assert "best-known batch 32" in back.reason
    assert state.settings.batch_size == 32


def test_fp32_lowered_to_bf16_and_never_bf16_to_fp16() -> None:
    sim = SimWorker(total=16 * GIB, prompt_len=1000, new_tokens=200)
    policy, state = AgentPolicy(), new_state(batch=104, precision="fp32")  # 87% of memory
    trace = drive(policy, state, sim, 300)
    precisions = [d for _, d in trace.decisions if d.action == DecisionAction.PRECISION]
    assert [(d.before.precision, d.after.precision) for d in precisions] == [("fp32", "bf16")]
    assert "memory" in precisions[0].reason or "OOM" in precisions[0].reason
    assert state.settings.precision == "bf16"
    # Under pressure at bf16 the batch shrinks; fp16 is never tried (same bytes).
    sim.other = 8 * GIB
    decision = policy.decide(state, Observation(300.0, sim.view()))
    assert decision is not None and decision.action == DecisionAction.SHRINK
    drive(policy, state, sim, 100, start=301.0, trace=trace)
    assert all(d.after.precision in ("fp32", "bf16") for _, d in trace.decisions)
    assert sim.ooms == []


def test_int8_only_when_allowed() -> None:
    tight = MemoryView(total_bytes=10 * GIB, used_bytes=int(9.5 * GIB), other_bytes=0)
    for allow, expected in ((False, DecisionAction.CAP_SEQ), (True, DecisionAction.PRECISION)):
        policy = AgentPolicy(PolicyConfig(allow_int8=allow))
        state = new_state(batch=1)
        # One reading above the high watermark is noise; the second in a row is pressure.
        assert policy.decide(state, Observation(100.0, tight, [cycle(1, 1500)])) is None
        decision = policy.decide(state, Observation(101.0, tight, [cycle(1, 1500)]))
        assert decision is not None and decision.action == expected
        assert decision.after.precision == ("int8" if allow else "bf16")


def cycle(batch: int, prompt: int, tps: float = 500.0, version: int = 1) -> CycleStats:
    return CycleStats(
        worker_id="w1", settings_version=version, batch_size=batch, max_prompt_len=prompt,
        mean_prompt_len=prompt, max_new_tokens=100, precision="bf16", max_seq_len=2048,
        tokens_generated=batch * 100, tokens_per_s=tps, latency_s=1.0, padding_ratio=0.2,
        queue_depth=5,
    )  # fmt: skip


def test_long_sequences_capped_then_relaxed() -> None:
    policy = AgentPolicy(PolicyConfig(seq_relax_s=60.0, max_batch=16))
    state = new_state(batch=16)
    ts = 0.0
    decisions = []
    for i in range(30):  # mostly short prompts; every 4th batch is long and slow
        long = i % 4 == 3
        c = cycle(16, 1800 if long else 200, 150.0 if long else 900.0, state.settings.version)
        ts += 1.0
        d = policy.decide(state, Observation(ts, None, [c]))
        decisions += [d] if d else []
    caps = [d for d in decisions if d.action == DecisionAction.CAP_SEQ]
    assert len(caps) == 1
    assert caps[0].after.max_seq_len == 1024  # around twice the typical 300 tokens
    assert "long batches" in caps[0].reason
    # Long prompts stop; after seq_relax_s of calm the cap is relaxed.
    relaxed = []
    for _ in range(120):
        ts += 1.0
        d = policy.decide(
            state, Observation(ts, None, [cycle(16, 200, 900.0, state.settings.version)])
        )
        relaxed += [d] if d and d.action == DecisionAction.RELAX_SEQ else []
    assert relaxed and relaxed[0].after.max_seq_len == 2048
    assert state.settings.max_seq_len == 2048


def test_relaxing_stops_at_the_model_context() -> None:
    policy = AgentPolicy(PolicyConfig(seq_relax_s=0.0, max_batch=16, max_seq_len=2048))
    state = new_state(batch=16)
    state.settings = state.settings.model_copy(update={"max_seq_len": 256})
    state.context_length = 512
    relaxed = []
    for i in range(60):
        c = cycle(16, 100, 900.0, state.settings.version)
        d = policy.decide(state, Observation(float(i), None, [c]))
        relaxed += [d] if d and d.action == DecisionAction.RELAX_SEQ else []
    assert [d.after.max_seq_len for d in relaxed] == [512]
    assert state.settings.max_seq_len == 512


def test_noisy_trace_changes_rarely() -> None:
    sim = SimWorker(noise=0.05, rng=random.Random(3))
    policy, state = AgentPolicy(), new_state(batch=4)
    trace = Trace()
    for i in range(2000):
        # A neighbour that comes and goes slightly around a level, as real ones do.
        sim.other = int((1.0 + 0.2 * random.Random(i).random()) * GIB)
        step(policy, state, sim, float(i), trace)
    changes = [t for t, _ in trace.decisions]
    assert len(changes) <= 12
    assert len([t for t in changes if t > 300]) <= 3
    assert sim.ooms == []
    reversals = sum(
        1
        for (_, a), (_, b) in zip(trace.decisions, trace.decisions[1:], strict=False)
        if (a.after.batch_size - a.before.batch_size) * (b.after.batch_size - b.before.batch_size)
        < 0
    )
    assert reversals <= 2


def test_memory_view_uses_pid_or_estimates() -> None:
    gpu = GpuSample(
        index=0, name="g", memory_used_bytes=10 * GIB, memory_total_bytes=80 * GIB,
        process_memory_bytes={11: 6 * GIB, 22: 3 * GIB},
    )  # fmt: skip
    by_pid = memory_view(gpu, 11, None, OVERHEAD)
    assert (by_pid.other_bytes, by_pid.own_bytes) == (3 * GIB, 6 * GIB)
    c = cycle(8, 200).model_copy(update={"memory_reserved_bytes": 5 * GIB})
    estimated = memory_view(gpu, 999, c, OVERHEAD)  # pid not visible (container)
    assert estimated.own_bytes == 5 * GIB + OVERHEAD
    assert estimated.other_bytes == 10 * GIB - 5 * GIB - OVERHEAD
    assert memory_view(gpu, None, None, OVERHEAD).other_bytes == 0


def test_config_rejects_inverted_watermarks() -> None:
    with pytest.raises(ValueError, match="watermark"):
        PolicyConfig(low_watermark=0.9, high_watermark=0.8)
