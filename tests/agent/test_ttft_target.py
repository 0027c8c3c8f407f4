"""Goodput under a latency target: the agent keeps the p95 time to first token under
``ttft_target_ms`` (AEGIS_TTFT_TARGET_MS), lever by lever, and logs the trade-off."""

from __future__ import annotations

from services.agent.config import AgentSettings
from services.agent.policy import AgentPolicy, MemoryView, Observation, PolicyConfig
from shared.schemas import CycleStats, DecisionAction
from tests.agent.sim import GIB, new_state

TARGET_MS = 500.0


def window(ttft_p95_s: float, running: int, waiting: int, version: int,
           step_tokens: int = 4096) -> CycleStats:  # fmt: skip
    return CycleStats(
        worker_id="w", settings_version=version, batch_size=running, max_prompt_len=400,
        mean_prompt_len=300, max_new_tokens=128, precision="bf16", max_seq_len=2048,
        tokens_generated=20_000, tokens_per_s=20_000.0, latency_s=1.0, padding_ratio=0.0,
        memory_peak_bytes=4 * GIB, queue_depth=waiting, running=running, waiting=waiting,
        ttft_p95_s=ttft_p95_s, max_batched_tokens=step_tokens,
    )  # fmt: skip


def idle_card() -> MemoryView:
    return MemoryView(total_bytes=140 * GIB, used_bytes=10 * GIB, other_bytes=0)


def policy() -> AgentPolicy:
    return AgentPolicy(PolicyConfig(ttft_target_ms=TARGET_MS, shrink_cooldown_s=0.0,
                                    shrink_cooldown_cycles=0, max_step_tokens=16384))  # fmt: skip


def test_requests_waiting_for_a_slot_get_more_slots() -> None:
    agent, state = policy(), new_state(batch=64)
    obs = Observation(100.0, idle_card(), [window(1.2, running=64, waiting=40, version=0)])
    decision = agent.decide(state, obs)
    assert decision is not None and decision.action == DecisionAction.GROW
    assert decision.after.batch_size == 128
    assert "TTFT p95 1200 ms > target 500 ms with 40 waiting for a slot" in decision.reason
    assert decision.inputs["ttft_p95_s"] == 1.2 and decision.inputs["ttft_target_s"] == 0.5
    assert decision.inputs["tokens_per_s"] == 20_000.0  # the trade-off, in the log


def test_slow_prefill_gets_a_larger_step_budget_then_fewer_sequences() -> None:
    agent, state = policy(), new_state(batch=256)
    budgets = []
    t, version = 100.0, 0
    for _ in range(3):  # 4096 -> 8192 -> 16384 (the cap)
        tokens = state.settings.max_batched_tokens or 4096
        obs = Observation(t, idle_card(), [window(0.9, 100, 0, version, step_tokens=tokens)])
        decision = agent.decide(state, obs)
        assert decision is not None
        budgets.append((decision.action, decision.after.max_batched_tokens))
        t, version = t + 5, decision.after.version
        if decision.action != DecisionAction.TTFT:
            break
    assert budgets[:2] == [(DecisionAction.TTFT, 8192), (DecisionAction.TTFT, 16384)]
    assert budgets[2][0] == DecisionAction.SHRINK and state.settings.batch_size == 192
    assert "fewer sequences per step (100 running)" in state.settings.reason


def test_a_burst_does_not_flip_the_slots_between_fewer_and_more() -> None:
    """The H200 trace (goodput, 200 requests/s): at the largest step budget the agent
    cut 256 slots to 192 with 250 running, requests then waited for a slot, it grew
    back, cut again... every half second, and the p95 doubled. Once requests have
    waited for a slot, fewer slots only queue them: the agent grows and stays until the
    queue has been clear for ``ttft_queue_cycles`` windows."""
    agent, state = policy(), new_state(batch=192)
    state.settings = state.settings.model_copy(update={"max_batched_tokens": 16384})
    trace = [(0.94, 192, 57), (0.64, 251, 0), (1.16, 250, 0), (1.46, 256, 0)]  # 2x: target 500
    actions = []
    for i, (p95, running, waiting) in enumerate(trace):
        version = state.settings.version
        obs = Observation(100.0 + 0.5 * i, idle_card(),
                          [window(p95, running, waiting, version, step_tokens=16384)])  # fmt: skip
        decision = agent.decide(state, obs)
        actions.append(decision.action if decision else None)
    # Grown for the queue; no cut while a recent window had requests waiting for a slot;
    # three windows with none waiting, and fewer sequences per step may be tried.
    assert actions == [DecisionAction.GROW, None, None, DecisionAction.SHRINK], actions


def test_under_the_target_nothing_moves_for_it_and_growth_waits_near_it() -> None:
    agent, state = policy(), new_state(batch=64)
    fine = agent.decide(state, Observation(100.0, idle_card(), [window(0.2, 64, 10, 0)]))
    assert fine is None or fine.action != DecisionAction.TTFT
    # At 90 % of the target the throughput rule does not add sequences either.
    # Without a target the same windows grow it; with one, the guard holds it.
    for agent, grows in ((AgentPolicy(PolicyConfig()), True), (policy(), False)):
        near = new_state(batch=64)
        actions = []
        for i in range(6):
            version = near.settings.version
            obs = Observation(100.0 + 20 * i, idle_card(), [window(0.45, 64, 10, version)])
            decision = agent.decide(near, obs)
            actions.append(decision.action if decision else None)
        assert (DecisionAction.GROW in actions) is grows, actions


def test_the_setting_reaches_the_policy() -> None:
    settings = AgentSettings(ttft_target_ms=250)
    assert settings.policy_config().ttft_target_ms == 250
    assert AgentSettings().policy_config().ttft_target_ms is None
