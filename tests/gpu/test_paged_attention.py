"""The paged decode-attention Triton kernel on CUDA: against the reference, in bf16 and
fp32, split and unsplit, and replayed from a CUDA graph after the inputs change."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from services.worker.core.paged_attention import (  # noqa: E402
    LaunchConfig,
    reference_decode_attention,
    triton_available,
    triton_decode_attention,
)
from tests.worker.core.test_paged_attention import CASES, Case, build, relative_error  # noqa: E402

pytestmark = pytest.mark.gpu
TINYLLAMA = Case(kv_heads=4, group=8, lens=(1, 450, 17, 640, 63, 300, 1024, 5))


def test_triton_is_used_on_cuda() -> None:
    assert triton_available(torch.device("cuda"))


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_per_case(name: str, splits: int | None) -> None:
    case = CASES[name]
    q, k, v, tables, lens = build(case, seed=7, device="cuda")
    got = triton_decode_attention(q, k, v, tables, lens, config=LaunchConfig(num_splits=splits))
    want = reference_decode_attention(q.float(), k.float(), v.float(), tables, lens)
    assert relative_error(got, want) < case.tolerance


@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_kernel_matches_reference_bf16_tinyllama(block_n: int, splits: int | None) -> None:
    q, k, v, tables, lens = build(TINYLLAMA, seed=8, dtype=torch.bfloat16, device="cuda")
    want = reference_decode_attention(q.float(), k.float(), v.float(), tables, lens)
    got = triton_decode_attention(
        q, k, v, tables, lens, config=LaunchConfig(block_n=block_n, num_splits=splits)
    )
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < 2e-2  # p is rounded to bf16 before the PV product


@pytest.mark.parametrize("splits", [None, 4])
def test_graph_replay_follows_new_tables_and_lengths(splits: int | None) -> None:
    q, k, v, tables, lens = build(TINYLLAMA, seed=9, dtype=torch.bfloat16, device="cuda")
    static_tables, static_lens = tables.clone(), lens.clone()
    wide = torch.full((20, tables.shape[1] + 6), k.shape[0] - 1, device="cuda")
    wide[: len(lens), : tables.shape[1]] = tables
    view = wide[: len(lens), : tables.shape[1]]  # a slice of a bigger buffer, as the runner
    out = torch.empty_like(q)
    config = LaunchConfig(num_splits=splits)
    triton_decode_attention(q, k, v, view, static_lens, out=out, config=config)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_decode_attention(q, k, v, view, static_lens, out=out, config=config)
    shuffled = static_tables[torch.randperm(len(lens), device="cuda")]
    view.copy_(shuffled)
    static_lens.copy_(torch.randint(1, 1000, lens.shape, device="cuda").minimum(
        torch.full_like(lens, tables.shape[1] * 16)))  # fmt: skip
    graph.replay()
    want = reference_decode_attention(q.float(), k.float(), v.float(), shuffled, static_lens)
    assert relative_error(out, want) < 2e-2
