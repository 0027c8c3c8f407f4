"""Decode attention over the paged KV cache: a Triton kernel and its PyTorch reference.

One decode step has one query token per sequence: ``q`` ``[B, H, D]``; a layer's cache is
``k_cache``/``v_cache`` ``[num_blocks + 1, block_size, Hkv, D]``; ``block_tables``
``[B, max_blocks]`` lists each sequence's blocks in order (padded with any valid block id);
``context_lens`` ``[B]`` counts the cached tokens of each sequence (>= 1). Key position
``p`` of sequence ``b`` lives at ``cache[block_tables[b, p // block_size], p % block_size]``.
Query head ``h`` reads KV head ``h // G`` (``G = H // Hkv``).

The kernel runs one program per (sequence, KV head, split): it loads the ``G`` query heads
of the group once (padded to 16 rows so ``tl.dot`` maps onto tensor cores), walks the
sequence's tokens ``BLOCK_N`` at a time through the block table up to ``context_lens[b]``
with an online softmax in fp32, and never copies or repeats the cache. When there are too
few (sequence, KV head) pairs to fill the GPU, each sequence's tokens are split across
programs and a second kernel merges the partial softmaxes (flash-decoding).

Everything launched depends on tensor shapes only (grid, splits, workspace sizes), never on
values, so a CUDA graph can capture it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None
    tl = None

# Too few programs leave SMs idle while each walks a long context: split below this many
# programs per SM (Hopper keeps several of these small programs resident per SM).
_PROGRAMS_PER_SM = 4
_MIN_TILES_PER_SPLIT = 2
_MAX_SPLITS = 16


@dataclass(frozen=True)
class LaunchConfig:
    """Kernel tuning knobs (``None`` fields are chosen from the shapes)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None


DEFAULT_CONFIG = LaunchConfig()


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on ``device`` (CUDA with triton installed)."""
    return torch.device(device).type == "cuda" and triton is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, D]`` attention output: the Triton kernel on CUDA, the reference elsewhere."""
    run = triton_decode_attention if triton_available(q.device) else reference_decode_attention
    return run(q, k_cache, v_cache, block_tables, context_lens, scale, out)


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: gather every listed block, mask past each length, softmax in fp32."""
    batch, heads, dim = _check(q, k_cache, v_cache, block_tables, context_lens)
    kv_heads = k_cache.shape[2]
    scale = dim**-0.5 if scale is None else scale
    width = block_tables.shape[1] * k_cache.shape[1]
    k = k_cache[block_tables].reshape(batch, width, kv_heads, dim).float()
    v = v_cache[block_tables].reshape(batch, width, kv_heads, dim).float()
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,bnkd->bkgn", grouped, k) * scale
    beyond = torch.arange(width, device=q.device) >= context_lens.unsqueeze(1)  # [B, N]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    result = torch.einsum("bkgn,bnkd->bkgd", scores.softmax(-1), v).reshape(batch, heads, dim)
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def triton_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """The Triton kernel (on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, heads, dim = _check(q, k_cache, v_cache, block_tables, context_lens)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a unit last stride")
    max_tokens = block_tables.shape[1] * block_size
    splits, tokens_per_split = _split_plan(batch * kv_heads, max_tokens, q.device, config)
    shapes = {
        "G": group,
        "G_PAD": max(16, triton.next_power_of_2(group)),
        "D": dim,
        "D_PAD": max(16, triton.next_power_of_2(dim)),
        "BLOCK_N": config.block_n,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    tuning = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if splits == 1:
        target, partial_ml = out, out  # the kernel writes normalised rows straight to out
    else:
        target = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
        partial_ml = torch.empty(2, batch, heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, target, partial_ml,
        scale * math.log2(math.e), tokens_per_split,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        target.stride(0), target.stride(1), target.stride(-2) if splits > 1 else 0,
        partial_ml.stride(0) if splits > 1 else 0,
        BLOCK_SIZE=block_size, SPLIT=splits > 1, **shapes, **tuning,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(batch, heads)](
            target, partial_ml, out, splits,
            target.stride(0), target.stride(1), target.stride(2), partial_ml.stride(0),
            out.stride(0), out.stride(1),
            D=dim, D_PAD=shapes["D_PAD"], S_PAD=max(2, triton.next_power_of_2(splits)),
        )  # fmt: skip
    return out


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[int, int, int]:
    """``(B, H, D)`` after checking the shapes agree (no data is read: graph-safe)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} / cache {tuple(k_cache.shape)} shapes disagree")
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be [B, blocks] and context_lens [B]")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q {q.dtype} and cache {k_cache.dtype}/{v_cache.dtype} dtypes differ")
    unit = (q.stride(-1), k_cache.stride(-1), v_cache.stride(-1), block_tables.stride(-1))
    if any(s != 1 for s in unit):
        raise ValueError("q, caches and block_tables need a unit stride in their last dim")
    return batch, heads, dim


def _split_plan(
    programs: int, max_tokens: int, device: torch.device, config: LaunchConfig
) -> tuple[int, int]:
    """``(splits, tokens per split)`` from shapes only; tokens per split is whole tiles."""
    tiles = triton.cdiv(max_tokens, config.block_n)
    if config.num_splits is not None:
        wanted = config.num_splits
    else:
        wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), programs)
        wanted = min(wanted, _MAX_SPLITS, max(1, tiles // _MIN_TILES_PER_SPLIT))
    tiles_per_split = triton.cdiv(tiles, max(1, wanted))
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * config.block_n


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small number exercises the same code
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, ml_ptr,
        scale_log2, tokens_per_split,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_tb,
        stride_ob, stride_oh, stride_os,
        stride_ml,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        start = split * tokens_per_split
        end = tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), start + tokens_per_split)

        rows = tl.arange(0, G_PAD)
        dims = tl.arange(0, D_PAD)
        offsets = tl.arange(0, BLOCK_N)
        heads = kv_head * G + rows
        row_ok = rows < G
        dim_ok = dims < D
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # [G_PAD, D_PAD]

        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        for tile in range(start, end, BLOCK_N):
            pos = tile + offsets
            live = pos < end
            block = tl.load(table + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            load_mask = live[:, None] & dim_ok[None, :]
            k = tl.load(
                k_base + (block * stride_kb + slot * stride_kt)[:, None] + dims[None, :],
                mask=load_mask,
                other=0.0,
            )  # [BLOCK_N, D_PAD]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            scores = tl.where(live[None, :], scores, float("-inf"))  # [G_PAD, BLOCK_N]
            # Every tile holds a live position, so m_new is finite and alpha never NaN.
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_base + (block * stride_vb + slot * stride_vt)[:, None] + dims[None, :],
                mask=load_mask,
                other=0.0,
            )
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_rows = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
        out_mask = row_ok[:, None] & dim_ok[None, :]
        if SPLIT:
            # Unnormalised partials; an empty split leaves m = -inf, l = 0 for the merge.
            tl.store(out_rows + split * stride_os + dims[None, :], acc, mask=out_mask)
            ml = ml_ptr + ((seq * (G * tl.num_programs(1)) + heads) * tl.num_programs(2) + split)
            tl.store(ml, m_i, mask=row_ok)
            tl.store(ml + stride_ml, l_i, mask=row_ok)
        else:
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            result = acc / safe_l[:, None]
            tl.store(out_rows + dims[None, :], result.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _merge_kernel(
        part_ptr, ml_ptr, out_ptr, splits,
        stride_pb, stride_ph, stride_ps, stride_ml,
        stride_ob, stride_oh,
        D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        head = tl.program_id(1)
        parts = tl.arange(0, S_PAD)
        dims = tl.arange(0, D_PAD)
        part_ok = parts < splits
        ml = ml_ptr + (seq * tl.num_programs(1) + head) * splits + parts
        m = tl.load(ml, mask=part_ok, other=float("-inf"))
        l_part = tl.load(ml + stride_ml, mask=part_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        weight = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # [S_PAD]
        total = tl.sum(weight * l_part, axis=0)
        acc = tl.load(
            part_ptr + seq * stride_pb + head * stride_ph
            + parts[:, None] * stride_ps + dims[None, :],
            mask=part_ok[:, None] & (dims < D)[None, :],
            other=0.0,
        )  # fmt: skip
        result = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(
            out_ptr + seq * stride_ob + head * stride_oh + dims,
            result.to(out_ptr.dtype.element_ty),
            mask=dims < D,
        )
