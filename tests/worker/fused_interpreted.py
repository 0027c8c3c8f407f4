"""The fused Triton kernels (services/worker/core/fused.py) against their PyTorch
references, on the CPU through Triton's interpreter. Triton must be imported with
``TRITON_INTERPRET=1`` for that, so ``test_fused_kernels.py`` runs this file in a pytest
of its own; the kernels' launch functions are called directly (the public functions pick
the references for CPU tensors).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from services.worker.core import fused  # noqa: E402
from services.worker.core import fused as reference  # noqa: E402

# fp16, not bf16: the interpreter (numpy) has no bf16 and truncates when it casts to it.
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_fused_kernels.py"
    return fused


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # The same roundings as the references; fp32 sums may differ in order only.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_normalises(interpreted, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 96, generator=gen).to(dtype)
    delta = torch.randn(7, 96, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    want_h = h + delta
    want = reference.rms_norm_reference(want_h, weight, 1e-5)
    normed, total = interpreted._launch_norm(h.clone(), delta, weight, 1e-5)
    assert torch.equal(total, want_h)  # one rounding of the sum, as h + delta
    _close(normed, want, dtype)
    plain, none = interpreted._launch_norm(h, None, weight, 1e-5)
    assert none is None
    _close(plain, reference.rms_norm_reference(h, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_two_step_form(interpreted, dtype) -> None:
    gate_up = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    _close(interpreted._launch_silu_and_mul(gate_up), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_rotates_in_place_and_stores_keys_and_values_at_their_slots(
    interpreted, dtype
) -> None:
    gen = torch.Generator().manual_seed(2)
    tokens, heads, kv_heads, dim, block, blocks = 6, 6, 2, 16, 4, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    v = v.view(tokens, kv_heads, dim)
    angles = torch.rand(40, dim // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    positions = torch.tensor([0, 3, 9, 17, 30, 39])
    slots = torch.tensor([19, 0, 7, 8, 12, 3])
    caches = [torch.zeros(blocks, block, kv_heads, dim, dtype=dtype) for _ in range(4)]
    want_q, want_k = reference.rotary_and_store(
        q.clone(), k.clone(), v.clone(), positions, cos, sin, caches[0], caches[1], slots
    )
    interpreted._launch_rotary(q, k, v, positions, cos, sin, caches[2], caches[3], slots)
    _close(q, want_q, dtype)  # written in place, through the views of qkv
    _close(k, want_k, dtype)
    _close(caches[2], caches[0], dtype)
    assert torch.equal(caches[3], caches[1])  # values are copied, never rounded
    untouched = [i for i in range(blocks * block) if i not in slots.tolist()]
    assert not caches[2].view(-1, kv_heads, dim)[untouched].any()
