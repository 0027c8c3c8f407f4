"""The step scheduler on synthetic sequences (no model): its contract as properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from services.worker.core.blocks import BlockPool
from services.worker.core.scheduler import Limits, Scheduler, StepPlan
from services.worker.core.sequence import SeqStatus, Sequence
from services.worker.rows import Row, RowPlan
from shared.schemas import GenerationRequest, SamplingParams

DECODER = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))


def make_seq(i: int, prompt: int, new: int) -> Sequence:
    request = GenerationRequest(
        id=f"s{i}", prompt="", prompt_token_ids=[0] * prompt,
        params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
    )  # fmt: skip
    row = Row(request, DECODER, 0.0)
    row.plan = RowPlan(list(request.prompt_token_ids), new)
    return Sequence(row, row.plan.prompt_ids, new)


def run_to_end(sched: Scheduler, seqs: list[Sequence], max_steps: int = 5000) -> list[StepPlan]:
    for seq in seqs:
        sched.add(seq)
    plans = []
    while sched.num_unfinished and len(plans) < max_steps:
        plan = sched.schedule()
        plans.append(plan)
        sched.update(plan)
        for chunk in plan.chunks:
            if chunk.samples:
                chunk.seq.row.add(0, frozenset(), 0.0)
                if chunk.seq.finished:
                    sched.finish(chunk.seq)
    return plans


workloads = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(
    workloads,
    st.integers(1, 6),
    st.integers(8, 48),
    st.integers(14, 40),
    st.sampled_from([1, 4, 16]),
)
def test_every_request_finishes_within_budget_without_leaks(
    shapes: list[tuple[int, int]], max_seqs: int, budget: int, blocks: int, block_size: int
) -> None:
    pool_tokens = blocks * block_size
    shapes = [(p, n) for p, n in shapes if p + n <= pool_tokens]
    seqs = [make_seq(i, p, n) for i, (p, n) in enumerate(shapes)]
    sched = Scheduler(BlockPool(blocks, block_size), Limits(max_seqs, budget, 4096))
    plans = run_to_end(sched, seqs)
    assert all(s.finished and s.status is SeqStatus.FINISHED for s in seqs)
    assert all(len(s.generated) == s.max_tokens for s in seqs)
    assert sched.pool.num_used == 0 and sched.pool.num_free == blocks
    for plan in plans:
        assert plan.num_tokens <= budget
        assert len(plan.chunks) <= max_seqs
        ids = [id(c.seq) for c in plan.chunks]
        assert len(ids) == len(set(ids))


def test_a_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    sched = Scheduler(BlockPool(64, 16), Limits(max_num_seqs=4, max_batched_tokens=64))
    short = make_seq(0, 4, 50)
    sched.add(short)
    first = sched.schedule()
    sched.update(first)
    short.row.add(0, frozenset(), 0.0)
    sched.add(make_seq(1, 300, 4))
    plan = sched.schedule()
    assert [c.seq for c in plan.decodes] == [short]
    assert [c.length for c in plan.prefills] == [63]  # the rest of the budget, not 300


def test_blocks_run_out_and_the_newest_is_preempted_then_recomputed() -> None:
    sched = Scheduler(BlockPool(6, 4), Limits(max_num_seqs=4, max_batched_tokens=64))
    seqs = [make_seq(i, 6, 10) for i in range(3)]
    plans = run_to_end(sched, seqs)
    assert sched.preemptions > 0
    assert any(plan.preempted for plan in plans)
    assert all(len(s.generated) == 10 for s in seqs)
    assert sched.pool.num_used == 0


def test_a_request_over_max_seq_len_waits_and_is_never_cut() -> None:
    limits = Limits(max_num_seqs=4, max_batched_tokens=512, max_seq_len=64)
    sched = Scheduler(BlockPool(64, 16), limits)
    long, short = make_seq(0, 60, 10), make_seq(1, 10, 4)
    sched.add(long)
    sched.add(short)
    plan = sched.schedule()
    assert [c.seq for c in plan.chunks] == [short]
    assert list(sched.waiting) == [long] and len(long.prompt_ids) == 60
    sched.limits = Limits(max_num_seqs=4, max_batched_tokens=512, max_seq_len=128)
    sched.update(plan)
    short.row.add(0, frozenset(), 0.0)
    plan = sched.schedule()
    assert long in [c.seq for c in plan.chunks]


def test_abort_frees_blocks_of_a_running_sequence() -> None:
    sched = Scheduler(BlockPool(8, 4), Limits())
    seq = make_seq(0, 10, 5)
    sched.add(seq)
    sched.update(sched.schedule())
    assert sched.pool.num_used == 3
    assert sched.abort("s0") is seq
    assert sched.pool.num_used == 0 and seq.status is SeqStatus.FINISHED
    assert sched.abort("s0") is None
