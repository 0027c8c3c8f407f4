"""Fused elementwise kernels of the Llama forward (Triton, CUDA), with PyTorch references.

Profiled on an H200 (``scripts/device/profile_core.py``), the matmuls of a packed 8192-token
prefill step ran near the card's peak while the plain PyTorch glue around them (RMSNorm in
fp32, rotary embedding, SiLU-and-multiply, residual adds, KV stores) took more time than
the matmuls: a dozen kernels per layer, each one a round trip of the activations through
memory. Each function here does one such group in one pass:

- :func:`add_rms_norm`: ``h = h + delta`` then RMSNorm of ``h`` (the residual update and
  the next layer norm, one read of each row);
- :func:`silu_and_mul`: ``silu(gate) * up`` of a fused gate/up projection;
- :func:`rotary_and_store`: rotary embedding of the query and key heads, in place, and the
  keys and values written to their cache slots.

Rounding follows the PyTorch path (and so HF's LlamaRMSNorm): the residual sum and the
normalised row are rounded to the model's dtype before the weight multiplies, SiLU is
rounded before the product. The reference functions are what the CPU runs; a Triton kernel
runs when the tensors are on CUDA and Triton is installed. Every launch depends on shapes
only, so a CUDA graph captures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references serve
    triton = None
    tl = None


def fused_available(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None


# -- references (the CPU path, and what the kernels are tested against) -------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm: normalise in fp32, scale in the model's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# -- public functions -----------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not fused_available(x):
        return rms_norm_reference(x, weight, eps)
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, rms_norm(h + delta))``; the sum may be written into ``h``."""
    if not fused_available(h):
        h = h + delta
        return h, rms_norm_reference(h, weight, eps)
    normed, total = _launch_norm(h, delta, weight, eps)
    assert total is not None
    return total, normed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` ``[T, 2I]`` (gate first): ``[T, I]``."""
    if not fused_available(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _launch_silu_and_mul(gate_up)


def rotary_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, H, D]`` and ``k`` ``[T, Hkv, D]`` by the rotary tables at
    ``positions``, then store ``k`` and ``v`` at the cache ``slots`` (``block * block_size
    + offset`` of a ``[blocks, block_size, Hkv, D]`` cache); the rotated ``(q, k)``.

    On CUDA the rotation is written in place (q, k and v may be views of one fused
    projection's output)."""
    if not fused_available(q):
        q = rotate_reference(q, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        k = rotate_reference(k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        _store_reference(k, v, k_cache, v_cache, slots)
        return q, k
    _launch_rotary(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    return q, k


def _store_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots
) -> None:
    heads, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v)


# -- launches ---------------------------------------------------------------------------------


def _launch_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.stride(-1) == 1 and weight.is_contiguous()
    rows, cols = x.shape
    out = torch.empty_like(x)
    if delta is not None:
        assert delta.shape == x.shape and delta.stride(-1) == 1
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x, delta if delta is not None else x, weight, out,
        x.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0),
        cols, eps, HAS_DELTA=delta is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out, (x if delta is not None else None)


def _launch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    assert gate_up.stride(-1) == 1
    rows, width = gate_up.shape
    inner = width // 2
    out = torch.empty((rows, inner), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    grid = (rows, triton.cdiv(inner, block))
    _silu_and_mul_kernel[grid](
        gate_up, out, gate_up.stride(0), out.stride(0), inner, BLOCK=block, num_warps=4
    )
    return out


def _launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == dim
    assert cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous()
    assert v_cache.is_contiguous() and dim % 2 == 0
    if tokens == 0:
        return
    _rotary_store_kernel[(tokens,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slots,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2,
        HEADS_PAD=triton.next_power_of_2(heads), KV_PAD=triton.next_power_of_2(kv_heads),
        HALF_PAD=triton.next_power_of_2(dim // 2), num_warps=4,
    )  # fmt: skip


# -- kernels ------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, delta_ptr, w_ptr, out_ptr,
        stride_x, stride_delta, stride_out,
        cols, eps,
        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / cols
        normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        out = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inner
        gate = tl.load(in_ptr + row * stride_in + offs, mask=mask, other=0.0)
        up = tl.load(in_ptr + row * stride_in + inner + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        out = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
        tl.store(out_ptr + row * stride_out + offs, out, mask=mask)

    @triton.jit
    def _rotate_heads(
        ptr, row_stride, t, cos1, sin1, cos2, sin2,
        heads: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    ):  # fmt: skip
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HALF_PAD)[None, :]
        mask = (h < heads) & (d < HALF)
        base = ptr + t * row_stride + h * (2 * HALF) + d
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        out1 = (a * cos1 - b * sin1).to(x1.dtype)
        out2 = (b * cos2 + a * sin2).to(x1.dtype)
        tl.store(base, out1, mask=mask)
        tl.store(base + HALF, out2, mask=mask)
        return out1, out2

    @triton.jit
    def _rotary_store_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_q, stride_k, stride_v, stride_cos,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        HEADS_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        pos = tl.load(pos_ptr + t)
        d = tl.arange(0, HALF_PAD)[None, :]
        dmask = d < HALF
        table = pos * stride_cos + d
        cos1 = tl.load(cos_ptr + table, mask=dmask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=dmask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF, mask=dmask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, stride_q, t, cos1, sin1, cos2, sin2, HEADS, HEADS_PAD, HALF, HALF_PAD)
        k1, k2 = _rotate_heads(
            k_ptr, stride_k, t, cos1, sin1, cos2, sin2, KV_HEADS, KV_PAD, HALF, HALF_PAD
        )
        # The cache row of this token: [Hkv, D] at slot * Hkv * D.
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, KV_PAD)[:, None]
        mask = (h < KV_HEADS) & dmask
        cache = slot * (KV_HEADS * 2 * HALF) + h * (2 * HALF) + d
        tl.store(kc_ptr + cache, k1, mask=mask)
        tl.store(kc_ptr + cache + HALF, k2, mask=mask)
        vrow = v_ptr + t * stride_v + h * (2 * HALF) + d
        tl.store(vc_ptr + cache, tl.load(vrow, mask=mask, other=0.0), mask=mask)
        tl.store(vc_ptr + cache + HALF, tl.load(vrow + HALF, mask=mask, other=0.0), mask=mask)
