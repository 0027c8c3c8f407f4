"""The agent sizes the engine core's KV pool to the room other processes leave it."""

from __future__ import annotations

import pytest

from services.agent.policy import (
    AgentPolicy,
    MemoryView,
    Observation,
    PolicyConfig,
    PolicyDecision,
    WorkerControlState,
)
from shared.schemas import CycleStats, DecisionAction
from tests.agent.sim import GIB, new_state

BLOCK = 16 * 22_528  # a TinyLlama block of 16 tokens in bf16
WEIGHTS = int(2.2e9)
ACTIVATIONS = 1 * GIB


def window(pool_bytes: int, used_blocks: int, version: int) -> CycleStats:
    """One window of a worker running the engine core."""
    return CycleStats(
        worker_id="w", settings_version=version, batch_size=64, max_prompt_len=400,
        mean_prompt_len=300, max_new_tokens=128, precision="bf16", max_seq_len=2048,
        tokens_generated=20_000, tokens_per_s=20_000.0, latency_s=1.0, padding_ratio=0.0,
        memory_peak_bytes=WEIGHTS + used_blocks * BLOCK + ACTIVATIONS,
        kv_pool_bytes=pool_bytes, kv_blocks_total=pool_bytes // BLOCK,
        kv_blocks_used=used_blocks, queue_depth=10,
    )  # fmt: skip


def view(other: int, total: int = 140 * GIB) -> MemoryView:
    return MemoryView(total_bytes=total, used_bytes=total // 2, other_bytes=other)


def test_the_pool_shrinks_at_once_for_a_neighbour_and_grows_back_after_the_cooldown() -> None:
    config = PolicyConfig(grow_cooldown_s=10.0, grow_cooldown_cycles=1)
    policy, state = AgentPolicy(config), new_state(batch=64)
    pool = 100 * GIB
    state.settings = state.settings.model_copy(update={"kv_budget_bytes": pool})
    fixed = WEIGHTS + ACTIVATIONS
    # A neighbour takes 60 GiB: the pool must fit in 90 % of the 80 GiB left, at once.
    shrink = policy.decide(state, Observation(100.0, view(60 * GIB), [window(pool, 5000, 0)]))
    assert shrink is not None and shrink.action == DecisionAction.KV_BUDGET
    target = int(0.9 * 80 * GIB - fixed)
    assert shrink.after.kv_budget_bytes == pytest.approx(target, rel=1e-6)
    assert "other processes hold 60.0 of 140.0 GiB" in shrink.reason
    assert shrink.inputs["kv_target_bytes"] == shrink.after.kv_budget_bytes
    assert shrink.after.batch_size == shrink.before.batch_size  # only the pool moved
    # The neighbour frees its memory: no growth inside the cooldown, then growth back.
    early = policy.decide(state, Observation(105.0, view(0), [window(target, 5000, 2)]))
    assert early is None or early.action != DecisionAction.KV_BUDGET
    grow = policy.decide(state, Observation(120.0, view(0), [window(target, 5000, 2)]))
    assert grow is not None and grow.action == DecisionAction.KV_BUDGET
    assert grow.after.kv_budget_bytes == pytest.approx(0.9 * 140 * GIB - fixed, rel=1e-6)


def test_small_changes_and_workers_without_a_pool_leave_the_budget_alone() -> None:
    policy, state = AgentPolicy(), new_state(batch=64)
    pool = int(0.9 * 140 * GIB - WEIGHTS - ACTIVATIONS)
    state.settings = state.settings.model_copy(update={"kv_budget_bytes": pool})
    steady = policy.decide(state, Observation(100.0, view(2 * GIB), [window(pool, 100, 0)]))
    assert steady is None or steady.action != DecisionAction.KV_BUDGET  # 1.5 %: no resize
    batch_engine = window(0, 0, 0).model_copy(update={"kv_blocks_total": 0})
    other = policy.decide(state, Observation(200.0, view(60 * GIB), [batch_engine]))
    assert other is None or other.action != DecisionAction.KV_BUDGET


def test_two_aegis_workers_on_one_gpu_converge_to_even_pools() -> None:
    """Worker a started first and took most of the card; b got what was left. With the
    peer known, both move to an even share (b grows, a shrinks); without it, b would
    only ever get 90 % of what a leaves."""
    config = PolicyConfig(grow_cooldown_s=0.0, grow_cooldown_cycles=0)
    total, fixed = 140 * GIB, WEIGHTS + ACTIVATIONS
    pools = {"a": 110 * GIB, "b": 10 * GIB}
    agents = {name: (AgentPolicy(config), new_state(batch=64)) for name in pools}
    for name, (_, state) in agents.items():
        state.settings = state.settings.model_copy(update={"kv_budget_bytes": pools[name]})
    first_took_it = Observation(0.0, view(pools["a"] + fixed), [window(pools["b"], 10, 0)])
    alone = AgentPolicy(config).decide(new_state(batch=64), first_took_it)
    assert alone is not None and alone.after.kv_budget_bytes < 0.9 * (30 * GIB)  # starved
    for step in range(4):
        for name, (policy, state) in agents.items():
            peer = "b" if name == "a" else "a"
            held = pools[peer] + fixed
            memory = MemoryView(total, total // 2, other_bytes=held, peer_workers=1,
                                peer_bytes=held)  # fmt: skip
            version = state.settings.version
            obs = Observation(100.0 + step, memory, [window(pools[name], 10, version)])
            decision = policy.decide(state, obs)
            if decision is not None and decision.action == DecisionAction.KV_BUDGET:
                pools[name] = decision.after.kv_budget_bytes
                assert "an even share with 1 other AEGIS worker(s)" in decision.reason
    even = 0.9 * total / 2 - fixed
    assert pools["a"] == pytest.approx(even, rel=0.02)
    assert pools["b"] == pytest.approx(even, rel=0.02)


def test_a_worker_started_beside_a_full_card_gets_a_pool_not_a_capped_batch() -> None:
    """A second worker started while the first held nearly all the card has a pool of a
    block or so and more memory than its room (weights, activation peak). Shrinking its
    batch or capping its sequence length frees none of it (that memory is allocated
    either way) and starved it on an H200 (1 sequence of 128 tokens, relaxed one
    doubling per cooldown); only its pool follows the room it gets."""
    decisions, state = _beside_a_full_card(
        PolicyConfig(grow_cooldown_s=10.0, grow_cooldown_cycles=1)
    )
    assert decisions and all(d.action == DecisionAction.KV_BUDGET for d in decisions)
    assert state.settings.batch_size == 256 and state.settings.max_seq_len == 2048
    even = 0.9 * 140 * GIB / 2 - WEIGHTS - ACTIVATIONS
    assert state.settings.kv_budget_bytes == pytest.approx(even, rel=0.02)


def test_memory_pressure_on_the_engine_core_lowers_the_precision_where_allowed() -> None:
    """The one memory lever beside the pool that frees memory on the engine core."""
    decisions, state = _beside_a_full_card(
        PolicyConfig(grow_cooldown_s=10.0, grow_cooldown_cycles=1, allow_int8=True)
    )
    actions = {d.action for d in decisions}
    assert actions == {DecisionAction.KV_BUDGET, DecisionAction.PRECISION}
    assert state.settings.precision == "int8" and state.settings.batch_size == 256


def _beside_a_full_card(config: PolicyConfig) -> tuple[list[PolicyDecision], WorkerControlState]:
    """40 s of windows of a worker whose peer and the card's other tenants hold 137 of
    its 140 GiB; the decisions made and the state they left."""
    policy, state = AgentPolicy(config), new_state(batch=256)
    held = 137 * GIB
    peer = MemoryView(140 * GIB, 139 * GIB, other_bytes=held, peer_workers=1, peer_bytes=held)
    decisions = []
    for second in range(0, 40, 2):
        pool = state.settings.kv_budget_bytes or BLOCK
        cycles = [window(pool, 0, state.settings.version)]
        decision = policy.decide(state, Observation(100.0 + second, peer, cycles))
        if decision is not None:
            decisions.append(decision)
    return decisions, state
