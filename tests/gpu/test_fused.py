"""The fused kernels on a GPU (``pytest -m gpu tests/gpu``): the public functions take the
Triton path for CUDA tensors and agree with the PyTorch references in bf16 at the shapes of
TinyLlama, also replayed from a CUDA graph."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from services.worker.core import fused  # noqa: E402

pytestmark = pytest.mark.gpu
TOKENS, HIDDEN, HEADS, KV_HEADS, DIM, INNER = 300, 2048, 32, 4, 64, 5632


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_norms_and_mlp_glue_agree_with_the_references() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16)
    delta = torch.randn_like(h)
    weight = torch.rand(HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5
    want_h = h + delta
    total, normed = fused.add_rms_norm(h.clone(), delta, weight, 1e-5)
    assert torch.equal(total, want_h)
    _close(normed, fused.rms_norm_reference(want_h, weight, 1e-5))
    _close(fused.rms_norm(h, weight, 1e-5), fused.rms_norm_reference(h, weight, 1e-5))
    gate_up = torch.randn(TOKENS, 2 * INNER, device="cuda", generator=gen, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(fused.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)


def test_rotary_and_store_agree_with_the_reference_when_replayed_from_a_graph() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(TOKENS, (HEADS + 2 * KV_HEADS) * DIM, device="cuda", generator=gen,
                      dtype=torch.bfloat16)  # fmt: skip
    angles = torch.rand(2048, DIM // 2, device="cuda", generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    positions = torch.randint(0, 2048, (TOKENS,), device="cuda", generator=gen)
    slots = torch.randperm(64 * 16, device="cuda", generator=gen)[:TOKENS]
    caches = [torch.zeros(64, 16, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
              for _ in range(4)]  # fmt: skip

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
        return q.view(TOKENS, HEADS, DIM), k.view(TOKENS, KV_HEADS, DIM), v.view(-1, KV_HEADS, DIM)

    q, k, v = views(qkv.clone())
    want_q = fused.rotate_reference(q, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    want_k = fused.rotate_reference(k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    fused._store_reference(want_k, v, caches[0], caches[1], slots)
    work = qkv.clone()
    scratch = [c.clone() for c in caches[2:]]
    fused.rotary_and_store(*views(work.clone()), positions, cos, sin, *scratch, slots)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.rotary_and_store(*views(work), positions, cos, sin, caches[2], caches[3], slots)
    work.copy_(qkv)
    graph.replay()
    got_q, got_k, _ = views(work)
    _close(got_q, want_q)
    _close(got_k, want_k)
    _close(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])


def test_fresh_prompt_chunks_take_varlen_flash_and_agree_with_the_padded_path() -> None:
    from types import SimpleNamespace

    from services.worker.core.runner import _Layout
    from services.worker.core.scheduler import Chunk

    lengths = [37, 300, 5, 128, 64]
    chunks, first = [], 0
    for i, n in enumerate(lengths):
        seq = SimpleNamespace(num_tokens=n, block_table=list(range(i * 20, i * 20 + 20)))
        chunks.append((Chunk(seq, 0, n), first))  # type: ignore[arg-type]
        first += n
    layout = _Layout.build(chunks, first, 16, 999)
    varlen = layout.attention(torch.device("cuda"), HEADS // KV_HEADS)
    assert varlen.cu_lengths is not None
    padded = layout.attention(torch.device("cuda"), HEADS // KV_HEADS)
    padded.cu_lengths = None
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(first, HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(first, KV_HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    _close(varlen(q, k, v, ()), padded(q, k, v, ()))
