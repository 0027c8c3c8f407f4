"""The engine core on CPU with ``synthetic:tiny`` (fp32): its outputs equal HF
``generate``'s, whatever joins when, preemptions, OOMs and reconfigurations included."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from services.worker.core.engine import CoreConfig, EngineCore, StepOutput
from services.worker.engine import BatchLimits, HFGenerateEngine
from services.worker.model import LoadedModel
from services.worker.oom import OomInjector
from services.worker.rows import RequestOutcome
from shared.schemas import ControlSettings, GenerationRequest, SamplingParams, TokenDelta

KV_BYTES_PER_BLOCK_OF_4 = 2 * 2 * 2 * 16 * 4 * 4  # K+V, 2 layers, 2 heads, dim 16, fp32, 4 tokens


@pytest.fixture
def fp32(tiny: LoadedModel) -> Iterator[LoadedModel]:
    tiny.model.float()  # a module-scoped model: every test starts at fp32
    tiny.precision = "fp32"
    yield tiny
    tiny.model.float()
    tiny.precision = "fp32"


def make_requests(count: int, seed: int = 0, **params: object) -> list[GenerationRequest]:
    rng = random.Random(seed)
    params.setdefault("temperature", 0.0)
    return [
        GenerationRequest(
            id=f"r{i}",
            prompt="p",
            prompt_token_ids=[1] + [rng.randint(4, 511) for _ in range(rng.randint(1, 70))],
            params=SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True, **params),  # type: ignore[arg-type]
        )
        for i in range(count)
    ]


def reference(loaded: LoadedModel, requests: list[GenerationRequest]) -> dict[str, str]:
    engine = HFGenerateEngine(loaded)
    limits = BatchLimits(max_seq_len=512, ignore_eos=True)
    return {r.id: engine.run([r], limits).results[0].text for r in requests}


def drive(
    core: EngineCore,
    requests: list[GenerationRequest],
    joins_per_step: int = 2,
    on_step: object = None,
) -> tuple[dict[str, RequestOutcome], list[StepOutput]]:
    """Requests join a few per step while the core runs; every output collected."""
    pending, done, outputs = list(requests), {}, []
    while pending or core.has_work:
        for _ in range(joins_per_step):
            if pending:
                core.add(pending.pop(0))
        out = core.step()
        outputs.append(out)
        for outcome in out.finished:
            assert outcome.request_id not in done, "answered twice"
            done[outcome.request_id] = outcome
        if callable(on_step):
            on_step(len(outputs))
        assert len(outputs) < 10_000
    return done, outputs


def config(blocks: int = 512, **overrides: object) -> CoreConfig:
    base = {"block_size": 4, "max_num_seqs": 6, "max_batched_tokens": 48,
            "kv_budget_bytes": blocks * KV_BYTES_PER_BLOCK_OF_4}  # fmt: skip
    return CoreConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("blocks", "budget", "joins"),
    [(512, 48, 2), (40, 48, 3), (28, 16, 1), (512, 4096, 40)],
    ids=["roomy", "preempting", "tiny-pool-small-steps", "all-at-once"],
)
def test_greedy_output_equals_hf_generate(
    fp32: LoadedModel, blocks: int, budget: int, joins: int
) -> None:
    requests = make_requests(30)
    expected = reference(fp32, requests)
    core = EngineCore(fp32, config(blocks, max_batched_tokens=budget))
    done, outputs = drive(core, requests, joins)
    assert {rid: o.text for rid, o in done.items()} == expected
    assert all(o.finish_reason == "length" for o in done.values())
    assert all(done[r.id].completion_tokens == r.params.max_tokens for r in requests)
    stats = core.stats()
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0
    assert all(o.stats.prefill_tokens + o.stats.decode_tokens <= budget for o in outputs)
    if blocks == 40:
        assert stats.preemptions > 0  # the tiny pool forced recomputation, output unchanged


def test_memory_follows_the_tokens_held(fp32: LoadedModel) -> None:
    core = EngineCore(fp32, config(512))
    core.add(make_requests(1)[0])
    core.step()
    held = core.stats().kv_blocks_used
    assert 0 < held < 512 * 0.1
    while core.has_work:
        core.step()
    assert core.stats().kv_blocks_used == 0


def test_stream_deltas_join_to_the_final_text(fp32: LoadedModel) -> None:
    requests = [r.model_copy(update={"stream": True}) for r in make_requests(6, seed=3)]
    core = EngineCore(fp32, config())
    done, outputs = drive(core, requests)
    joined: dict[str, str] = {}
    for out in outputs:
        for delta in out.deltas:
            assert isinstance(delta, TokenDelta)
            assert delta.offset == len(joined.get(delta.request_id, ""))
            joined[delta.request_id] = joined.get(delta.request_id, "") + delta.text
    for rid, outcome in done.items():
        assert outcome.text.startswith(joined.get(rid, ""))  # the rest comes with the result
    assert sum(len(out.deltas) for out in outputs) > len(requests)  # step by step


def test_a_seeded_request_samples_the_same_text_alone_and_in_a_batch(fp32: LoadedModel) -> None:
    sampled = make_requests(8, seed=5, temperature=0.9, top_p=0.8)
    target = sampled[3].model_copy(
        update={"params": sampled[3].params.model_copy(update={"seed": 42, "max_tokens": 20})}
    )
    alone, _ = drive(EngineCore(fp32, config()), [target])
    crowd, _ = drive(EngineCore(fp32, config(blocks=30)), [*sampled[:3], target, *sampled[4:]])
    assert alone["r3"].text == crowd["r3"].text and alone["r3"].completion_tokens == 20
    other_seed = target.model_copy(update={"params": target.params.model_copy(update={"seed": 43})})
    differs, _ = drive(EngineCore(fp32, config()), [other_seed])
    assert differs["r3"].text != alone["r3"].text


def test_bad_requests_get_errors_and_the_others_run(fp32: LoadedModel) -> None:
    good = make_requests(2)
    too_long = GenerationRequest(id="long", prompt="p", prompt_token_ids=[5] * 500,
                                 params=SamplingParams(max_tokens=100))  # fmt: skip
    bad_ids = GenerationRequest(id="ids", prompt="p", prompt_token_ids=[5, 9999])
    huge_seed = GenerationRequest(
        id="seed", prompt="p", prompt_token_ids=[1, 5, 6],
        params=SamplingParams(max_tokens=4, temperature=1.0, seed=2**64 + 5),
    )  # fmt: skip
    done, _ = drive(EngineCore(fp32, config()), [too_long, *good, bad_ids, huge_seed])
    assert done["long"].finish_reason == "error" and "context length 512" in str(done["long"].error)
    assert done["ids"].finish_reason == "error" and "outside the vocabulary" in str(
        done["ids"].error
    )
    assert done["seed"].finish_reason == "length" and done["seed"].completion_tokens == 4
    assert all(done[r.id].finish_reason == "length" for r in good)


def test_max_seq_len_admits_but_never_cuts(fp32: LoadedModel) -> None:
    core = EngineCore(fp32, config())
    core.apply(ControlSettings(batch_size=6, max_seq_len=32, precision="fp32"))
    [short, long] = make_requests(2, seed=11)
    short = short.model_copy(update={"prompt_token_ids": [1, 5, 6]})
    long = long.model_copy(update={"prompt_token_ids": [1] + [7] * 40})
    expected = reference(fp32, [short, long])
    core.add(short)
    core.add(long)
    finished: dict[str, RequestOutcome] = {}
    for _ in range(60):
        finished.update({o.request_id: o for o in core.step().finished})
    assert set(finished) == {short.id}  # the long one waits: prompt 41 > 32, never cut
    core.apply(ControlSettings(version=2, batch_size=6, max_seq_len=512, precision="fp32"))
    while core.has_work:
        finished.update({o.request_id: o for o in core.step().finished})
    assert finished[long.id].text == expected[long.id]
    assert finished[long.id].prompt_tokens == 41 and finished[long.id].note is None


def test_a_request_waiting_for_max_seq_len_times_out_with_a_clear_error(
    fp32: LoadedModel,
) -> None:
    core = EngineCore(fp32, config(admission_timeout_s=0.01))
    core.apply(ControlSettings(batch_size=6, max_seq_len=16, precision="fp32"))
    core.add(GenerationRequest(id="w", prompt="p", prompt_token_ids=[1] * 30))
    outcomes: list[RequestOutcome] = []
    while not outcomes:
        outcomes += core.step().finished
    assert outcomes[0].finish_reason == "error"
    assert "max_seq_len 16" in str(outcomes[0].error) and "30 tokens" in str(outcomes[0].error)


def test_abort_frees_blocks_and_answers_cancelled(fp32: LoadedModel) -> None:
    core = EngineCore(fp32, config())
    for request in make_requests(3, seed=2):
        core.add(request)
    core.step()
    assert core.stats().kv_blocks_used > 0
    assert core.abort("r1") and not core.abort("nope")
    out = core.step()
    cancelled = [o for o in out.finished if o.request_id == "r1"]
    assert cancelled and cancelled[0].finish_reason == "cancelled"
    while core.has_work:
        core.step()
    assert core.stats().kv_blocks_used == 0


def test_an_oom_is_recovered_and_loses_nothing(fp32: LoadedModel) -> None:
    requests = make_requests(16, seed=4)
    expected = reference(fp32, requests)
    fault = OomInjector(max_tokens=40, times=3)  # steps over 40 tokens "run out of memory"
    core = EngineCore(fp32, config(max_batched_tokens=96), fault=fault)
    done, outputs = drive(core, requests, joins_per_step=8)
    ooms = [o.stats.oom for o in outputs if o.stats.oom is not None]
    assert len(ooms) == fault.injected >= 2 and all(o.recovered for o in ooms)
    assert {rid: o.text for rid, o in done.items()} == expected


def test_an_oom_alone_fails_that_request_only(fp32: LoadedModel) -> None:
    fault = OomInjector(max_tokens=0)  # every step fails
    core = EngineCore(fp32, config(), fault=fault)
    core.add(make_requests(1)[0])
    outcomes: list[RequestOutcome] = []
    for _ in range(200):
        outcomes += core.step().finished
        if outcomes:
            break
    assert outcomes and outcomes[0].finish_reason == "error"
    assert "out of memory" in str(outcomes[0].error)
    assert core.stats().kv_blocks_used == 0


@pytest.mark.parametrize("change", ["precision", "kv_budget"])
def test_reconfiguring_mid_run_loses_nothing(fp32: LoadedModel, change: str) -> None:
    requests = make_requests(12, seed=9)
    expected = reference(fp32, requests)
    core = EngineCore(fp32, config())
    update = (
        {"precision": "bf16"}
        if change == "precision"
        else {"kv_budget_bytes": 30 * KV_BYTES_PER_BLOCK_OF_4}
    )

    def reconfigure(step: int) -> None:
        if step == 5:
            fields = {"batch_size": 6, "max_seq_len": 512, "precision": "fp32", **update}
            core.apply(ControlSettings(**fields))  # type: ignore[arg-type]

    done, _ = drive(core, requests, on_step=reconfigure)
    assert set(done) == set(expected) and all(o.finish_reason == "length" for o in done.values())
    if change == "precision":
        assert core.precision == "bf16" and fp32.model.dtype == torch.bfloat16
    else:
        assert core.stats().kv_blocks_total == 30
        assert {rid: o.text for rid, o in done.items()} == expected


def test_decode_steps_ahead_change_nothing_but_the_number_of_steps(fp32: LoadedModel) -> None:
    greedy = make_requests(10, seed=21)
    sampled = [
        r.model_copy(update={"id": f"s{i}", "params": r.params.model_copy(
            update={"temperature": 0.8, "top_p": 0.9, "seed": 100 + i})})
        for i, r in enumerate(make_requests(4, seed=22))
    ]  # fmt: skip
    expected = reference(fp32, greedy)
    runs = {}
    for steps in (1, 7):
        core = EngineCore(fp32, config(decode_steps=steps, max_num_seqs=16))
        done, outputs = drive(core, [*greedy, *sampled], joins_per_step=14)
        runs[steps] = ({rid: o.text for rid, o in done.items()}, len(outputs))
        assert all(o.completion_tokens == r.params.max_tokens for r in [*greedy, *sampled]
                   for o in [done[r.id]])  # fmt: skip
        assert core.stats().kv_blocks_used == 0
    assert {rid: runs[7][0][rid] for rid in expected} == expected
    assert runs[7][0] == runs[1][0]  # seeded sampling too: same text, any step grouping
    assert runs[7][1] < runs[1][1] / 2  # far fewer host round trips


def test_a_request_that_breaks_a_step_fails_alone_and_the_others_go_on(
    fp32: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = make_requests(6, seed=31)
    poison = requests[2].model_copy(update={"id": "poison"})
    requests[2] = poison
    expected = reference(fp32, [r for r in requests if r.id != "poison"])
    core = EngineCore(fp32, config(decode_steps=1))
    real_execute = core.runner.execute

    def execute(plan, sampling):  # type: ignore[no-untyped-def]
        if any(c.seq.request_id == "poison" for c in plan.chunks):
            raise ValueError("Overflow when unpacking long long")
        return real_execute(plan, sampling)

    monkeypatch.setattr(core.runner, "execute", execute)
    done, _ = drive(core, requests, joins_per_step=6)
    assert done["poison"].finish_reason == "error" and "Overflow" in str(done["poison"].error)
    assert {rid: o.text for rid, o in done.items() if rid != "poison"} == expected
    assert core.stats().kv_blocks_used == 0 and not core.has_work


def test_the_kv_pool_shrinks_and_grows_live_without_losing_a_request(fp32: LoadedModel) -> None:
    requests = make_requests(12, seed=41)
    expected = reference(fp32, requests)
    core = EngineCore(fp32, config(blocks=200, max_num_seqs=8, decode_steps=2))
    reports = []

    def resize(step: int) -> None:
        used = core.stats().kv_blocks_used
        if step == 4:  # smaller, still holding every running sequence's blocks
            reports.append(core.resize_kv((used + 10) * KV_BYTES_PER_BLOCK_OF_4))
        elif step == 9:  # smaller than what the running sequences hold: some wait
            reports.append(core.resize_kv(max(8, used // 2) * KV_BYTES_PER_BLOCK_OF_4))
        elif step == 14:
            reports.append(core.resize_kv(300 * KV_BYTES_PER_BLOCK_OF_4))

    done, _ = drive(core, requests, joins_per_step=3, on_step=resize)
    assert {rid: o.text for rid, o in done.items()} == expected
    first, second, third = reports
    assert first.blocks_after < first.blocks_before and first.preempted == 0
    assert second.preempted > 0 and third.blocks_after == 300
    assert core.stats().kv_blocks_total == 300 and core.stats().kv_blocks_used == 0
    assert core.runner.cache is not None and core.runner.cache.scratch_block == 300


def _device_full(monkeypatch: pytest.MonkeyPatch, refusals: int) -> list[tuple[int, ...]]:
    """The next ``refusals`` ``new_zeros`` calls raise a CUDA-style OOM (another process
    took the memory); the shapes refused are listed."""
    real = torch.Tensor.new_zeros
    refused: list[tuple[int, ...]] = []

    def new_zeros(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if len(refused) < refusals:
            refused.append(tuple(args[0]) if args else ())  # type: ignore[arg-type]
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
    return refused


def test_a_shrink_on_a_full_device_stages_blocks_in_host_memory(
    fp32: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = make_requests(10, seed=43)
    expected = reference(fp32, requests)
    core = EngineCore(fp32, config(blocks=200, max_num_seqs=8, decode_steps=2))
    reports = []

    def shrink(step: int) -> None:
        if step == 5:  # every layer's new tensor is refused: all go through the host
            refused = _device_full(monkeypatch, refusals=10_000)
            used = core.stats().kv_blocks_used
            reports.append(core.resize_kv((used + 20) * KV_BYTES_PER_BLOCK_OF_4))
            assert len(refused) == 2 * len(core.runner.weights.layers)
            monkeypatch.undo()

    done, _ = drive(core, requests, joins_per_step=3, on_step=shrink)
    assert {rid: o.text for rid, o in done.items()} == expected  # the cache survived it
    (report,) = reports
    assert report.blocks_after < 200 and report.preempted == 0


def test_a_resize_that_cannot_get_memory_remakes_the_pool_and_loses_nothing(
    fp32: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = make_requests(10, seed=44)
    expected = reference(fp32, requests)
    core = EngineCore(fp32, config(blocks=100, max_num_seqs=8, decode_steps=2))
    reports = []

    def grow(step: int) -> None:
        if step == 5:  # a growth whose memory went to another process meanwhile

            def fail(*args: object, **kwargs: object) -> None:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

            monkeypatch.setattr(core.runner.cache, "resize", fail)
            running = core.stats().running
            reports.append((running, core.resize_kv(300 * KV_BYTES_PER_BLOCK_OF_4)))

    done, _ = drive(core, requests, joins_per_step=3, on_step=grow)
    assert {rid: o.text for rid, o in done.items()} == expected  # recomputed, not lost
    ((running, report),) = reports
    assert running > 0 and report.preempted == running and report.blocks_after == 300
    assert core.stats().kv_blocks_total == 300 and core.stats().kv_blocks_used == 0


def test_a_kv_budget_setting_resizes_the_pool_in_place(fp32: LoadedModel) -> None:
    core = EngineCore(fp32, config(blocks=100))
    core.add(make_requests(1, seed=5)[0])
    core.step()
    held = core.stats().kv_blocks_used
    settings = ControlSettings(batch_size=6, max_seq_len=512, precision="fp32",
                               kv_budget_bytes=40 * KV_BYTES_PER_BLOCK_OF_4)  # fmt: skip
    assert any("100 -> 40 blocks" in change for change in core.apply(settings))
    assert core.stats().kv_blocks_total == 40 and core.stats().kv_blocks_used == held
    assert core.stats().running == 1  # kept running through the resize


def test_a_request_larger_than_a_shrunk_pool_waits_then_gets_a_clear_error(
    fp32: LoadedModel,
) -> None:
    core = EngineCore(fp32, config(blocks=100, admission_timeout_s=0.05))
    core.resize_kv(10 * KV_BYTES_PER_BLOCK_OF_4)  # 40 tokens: a neighbour took the rest
    core.add(GenerationRequest(id="big", prompt="p", prompt_token_ids=[1] * 30,
                               params=SamplingParams(max_tokens=20)))  # fmt: skip
    core.add(GenerationRequest(id="huge", prompt="p", prompt_token_ids=[1] * 300,
                               params=SamplingParams(max_tokens=200)))  # fmt: skip
    first = core.step().finished  # larger than even the pool as sized at start: at once
    assert [o.request_id for o in first] == ["huge"] and "whole KV pool (400)" in str(
        first[0].error
    )
    assert core.stats().waiting == 1  # "big" fits the pool it had: it waits a while
    outcomes: list[RequestOutcome] = []
    while not outcomes:
        outcomes += core.step().finished
    assert outcomes[0].finish_reason == "error"
    assert "the KV pool, now 40 tokens" in str(outcomes[0].error)


def test_decode_steps_run_ahead_while_every_slot_is_taken(fp32: LoadedModel) -> None:
    requests = make_requests(9, seed=51)
    expected = reference(fp32, requests)
    counts = {}
    for steps in (1, 6):
        core = EngineCore(fp32, config(max_num_seqs=3, decode_steps=steps))
        done, outputs = drive(core, requests, joins_per_step=9)  # six always wait
        assert {rid: o.text for rid, o in done.items()} == expected
        counts[steps] = len(outputs)
    assert counts[6] < counts[1] * 0.6
