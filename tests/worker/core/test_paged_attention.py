"""Paged decode attention: the PyTorch reference against SDPA, the Triton kernel (under
the Triton interpreter, on CPU) against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.worker.core.paged_attention import (
    LaunchConfig,
    paged_decode_attention,
    reference_decode_attention,
    triton_available,
    triton_decode_attention,
)

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Case:
    kv_heads: int
    group: int
    lens: tuple[int, ...]
    dim: int = 64
    block_size: int = 16
    splits: int | None = None  # None: the kernel's own plan
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-4  # relative to the largest output, vs the fp32 reference


# Lengths cover 1, exact block multiples, ragged tails and tables wider than needed.
CASES = {
    "tinyllama_g8": Case(kv_heads=4, group=8, lens=(1, 17, 128, 45)),
    "smollm_g3": Case(kv_heads=3, group=3, lens=(100, 1, 33)),
    "mha_g1": Case(kv_heads=2, group=1, lens=(16, 127, 2)),
    "g8_split3": Case(kv_heads=2, group=8, lens=(1, 200, 64), splits=3),
    "g3_split_empty_tail": Case(kv_heads=3, group=3, lens=(3, 250), splits=4),
    "small_block_d32": Case(kv_heads=2, group=3, lens=(9, 40), dim=32, block_size=8),
    # Half precision rounds p before the PV product. (The interpreter can't run bf16 dots:
    # it multiplies bf16's raw uint16 storage; the GPU tests cover bf16.)
    "tinyllama_fp16": Case(kv_heads=4, group=8, lens=(450, 3), dtype=torch.float16, tolerance=2e-3),
}


def build(case: Case, seed: int, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Random q/caches and block tables scattered over a pool, sliced from a wider buffer."""
    dtype = dtype or case.dtype
    gen = torch.Generator().manual_seed(seed)
    batch, heads = len(case.lens), case.kv_heads * case.group
    blocks = -(-max(case.lens) // case.block_size) + 1  # one spare padded column
    pool = batch * blocks + 5
    cache_shape = (pool + 1, case.block_size, case.kv_heads, case.dim)
    k = torch.randn(cache_shape, generator=gen)
    v = torch.randn(cache_shape, generator=gen)
    q = torch.randn(batch, heads, case.dim, generator=gen)
    wide = torch.full((batch + 3, blocks + 4), pool, dtype=torch.int64)  # pool = scratch id
    order = torch.randperm(pool, generator=gen)
    for b, length in enumerate(case.lens):
        used = -(-length // case.block_size)
        wide[b, :used] = order[b * blocks : b * blocks + used]
    tables = wide[:batch, :blocks]
    lens = torch.tensor(case.lens, dtype=torch.int64)
    moved = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return (*moved, tables.to(device), lens.to(device))


def sdpa_per_sequence(q, k_cache, v_cache, tables, lens) -> torch.Tensor:
    """Each sequence's keys copied contiguous, then SDPA with grouped heads."""
    rows = []
    block_size = k_cache.shape[1]
    for b, length in enumerate(lens.tolist()):
        used = tables[b, : -(-length // block_size)]
        k = k_cache[used].flatten(0, 1)[:length].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[used].flatten(0, 1)[:length].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q[b].unsqueeze(1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), enable_gqa=True
        )  # [1, H, 1, D]
        rows.append(out[0, :, 0])
    return torch.stack(rows)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_sdpa_on_contiguous_copy(name: str) -> None:
    inputs = build(CASES[name], seed=1, dtype=torch.float32)
    got = reference_decode_attention(*inputs)
    assert got.shape == inputs[0].shape
    assert relative_error(got, sdpa_per_sequence(*inputs)) < 1e-5


def test_reference_ignores_cache_rows_past_each_length() -> None:
    q, k, v, tables, lens = build(CASES["tinyllama_g8"], seed=2)
    before = reference_decode_attention(q, k, v, tables, lens)
    k[pool_row := tables[1, 1], 1:] = 1e4  # seq 1 has 17 tokens: only slot 0 of its 2nd block
    v[pool_row, 1:] = 1e4
    assert torch.equal(reference_decode_attention(q, k, v, tables, lens), before)


def test_reference_writes_into_out_and_honours_scale() -> None:
    q, k, v, tables, lens = build(CASES["smollm_g3"], seed=3)
    out = torch.empty_like(q)
    result = reference_decode_attention(q, k, v, tables, lens, scale=0.5, out=out)
    assert result is out
    want = sdpa_per_sequence(q * (0.5 * 64**0.5), k, v, tables, lens)
    assert relative_error(out, want) < 1e-5


def test_dispatch_uses_reference_off_cuda() -> None:
    inputs = build(CASES["mha_g1"], seed=4)
    assert not triton_available(torch.device("cpu"))
    assert torch.equal(paged_decode_attention(*inputs), reference_decode_attention(*inputs))


def test_shape_mismatch_is_rejected() -> None:
    q, k, v, tables, lens = build(CASES["smollm_g3"], seed=5)
    with pytest.raises(ValueError, match="does not fit"):
        reference_decode_attention(q[:, :8], k, v, tables, lens)  # 8 heads over 3 KV heads
    with pytest.raises(ValueError, match="block_tables"):
        reference_decode_attention(q, k, v, tables[:2], lens)


def interpreter_errors() -> dict[str, float]:
    """Run inside a ``TRITON_INTERPRET=1`` process: kernel vs fp32 reference per case."""
    errors = {}
    for seed, (name, case) in enumerate(CASES.items()):
        q, k, v, tables, lens = build(case, seed=10 + seed)
        got = triton_decode_attention(
            q, k, v, tables, lens, config=LaunchConfig(num_splits=case.splits)
        )
        want = reference_decode_attention(q.float(), k.float(), v.float(), tables, lens)
        assert got.dtype == case.dtype
        errors[name] = relative_error(got, want)
    return errors


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, float]:
    """One interpreter subprocess for every case, so TRITON_INTERPRET never leaks here."""
    pytest.importorskip("triton")
    code = (
        "import json; from tests.worker.core.test_paged_attention import interpreter_errors; "
        "print('ERRORS=' + json.dumps(interpreter_errors()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ERRORS="))
    return dict(json.loads(line.removeprefix("ERRORS=")))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_matches_reference_in_interpreter(
    name: str, kernel_errors: dict[str, float]
) -> None:
    assert kernel_errors[name] < CASES[name].tolerance


@pytest.mark.parametrize("split", [False, True])
def test_kernel_compiles_for_hopper_with_pipelined_vector_loads(split: bool) -> None:
    """No GPU here: compile for sm_90 ahead of time and read the PTX. With the strides'
    16-divisibility (what Triton's launcher specialises on for TinyLlama's cache) the
    gathered K/V rows must be 16-byte ``cp.async`` copies feeding tensor-core ``mma``."""
    triton = pytest.importorskip("triton")
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    from services.worker.core import paged_attention

    kernel = paged_attention._decode_kernel
    aligned = {"q_ptr", "k_ptr", "v_ptr", "tables_ptr", "lens_ptr", "out_ptr", "ml_ptr"}
    aligned |= {n for n in kernel.arg_names if n.startswith("stride_") and n != "stride_tb"}
    signature = {}
    for name in kernel.arg_names:
        if name in ("q_ptr", "k_ptr", "v_ptr"):
            signature[name] = "*bf16"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in ("tables_ptr", "lens_ptr") else "*fp32"
        else:
            signature[name] = "constexpr" if name.isupper() else "i32"
    signature["scale_log2"] = "fp32"
    constants = dict(
        G=8, G_PAD=16, D=64, D_PAD=64, BLOCK_SIZE=16, BLOCK_N=64, SPLIT=split, PRECISION="tf32"
    )
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = compiler.ASTSource(kernel, signature, constants, attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2}
    )
    ptx = compiled.asm["ptx"]
    assert "cp.async.cg.shared.global" in ptx  # 16-byte async copies, software-pipelined
    assert "ld.global.b16" not in ptx  # no element-by-element loads of the cache
    assert "mma.sync" in ptx
