"""What the agent-split configuration of the colocated scenario reads from the records."""

from __future__ import annotations

from pathlib import Path

from experiments.scenarios.colocated import GIB, kv_decisions, pool_series
from shared.db.records import open_records
from shared.schemas import ControlSettings, CycleStats, Decision, DecisionAction
from tests.test_db_helpers import cycle

NAMES = {"p-worker-0": "worker-0", "p-worker-1": "worker-1"}


def _cycle(worker_id: str, ts: float, pool_gib: float) -> CycleStats:
    return cycle(ts, worker_id, kv_pool_bytes=int(pool_gib * GIB))


def _decision(worker_id: str, ts: float, action: DecisionAction, reason: str) -> Decision:
    before = ControlSettings(kv_budget_bytes=8 * GIB)
    after = before.model_copy(update={"kv_budget_bytes": 4 * GIB, "version": 1})
    return Decision(ts=ts, worker_id=worker_id, action=action, reason=reason, before=before,
                    after=after)  # fmt: skip


def test_pools_and_kv_decisions_of_the_run_s_workers_only(tmp_path: Path) -> None:
    database = tmp_path / "system.db"
    with open_records(f"sqlite:///{database}") as records:
        records.add_cycles([
            _cycle("p-worker-0", 99.0, 60.0),  # before the run
            _cycle("p-worker-0", 101.0, 100.0), _cycle("p-worker-1", 102.0, 10.0),
            _cycle("p-worker-0", 103.0, 100.0),  # no change: no new point
            _cycle("p-worker-0", 105.0, 55.0), _cycle("p-worker-1", 110.0, 50.5),
            _cycle("other-worker", 106.0, 1.0),  # another run's worker
        ])  # fmt: skip
        records.add_decisions([
            _decision("p-worker-0", 104.5, DecisionAction.KV_BUDGET, "an even share"),
            _decision("p-worker-1", 104.0, DecisionAction.GROW, "batch 4 -> 8"),
            _decision("p-worker-1", 109.0, DecisionAction.KV_BUDGET, "grow back"),
            _decision("other-worker", 108.0, DecisionAction.KV_BUDGET, "not ours"),
        ])  # fmt: skip
    assert pool_series(database, NAMES, since=100.0) == {
        "worker-0": [[1.0, 100.0], [5.0, 55.0]],
        "worker-1": [[2.0, 10.0], [10.0, 50.5]],
    }
    assert kv_decisions(database, NAMES, since=100.0) == [
        {"at_s": 4.5, "worker": "worker-0", "reason": "an even share"},
        {"at_s": 9.0, "worker": "worker-1", "reason": "grow back"},
    ]
