"""The model runner: weights, the KV cache tensors, memory profiling, and one step's
forward pass (decodes through captured CUDA graphs, prompt chunks eagerly).

Memory (on a GPU): the pool is sized from what is left once the weights are loaded and
the activation peaks of the largest step were measured by a profiling pass: the free
memory the driver reports (other processes' memory is counted there), less those peaks,
less a safety margin, capped by the KV budget setting. On the CPU the budget setting (or
a default) sizes the pool alone.

CUDA graphs bake in pointers, so every decode input lives in a static buffer; a graph is
captured per (batch bucket, context bucket) the first time one is needed, in one shared
memory pool. Reallocating the cache (a new budget or precision) drops them all.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.worker.core.llama import (
    ChunkAttention,
    DecodeAttention,
    KVCache,
    LlamaWeights,
    PrefillAttention,
    forward,
)
from services.worker.core.paged_attention import triton_available
from services.worker.core.sampling import SamplingBatch, sample
from services.worker.core.scheduler import Chunk, StepPlan

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CPU_DEFAULT_KV_BYTES = 256 * MIB
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass(frozen=True)
class RunnerConfig:
    block_size: int = 16
    kv_budget_bytes: int = 0  # 0: as much as memory allows
    max_batched_tokens: int = 8192  # the largest step, for the profiling pass
    max_num_seqs: int = 256
    cuda_graphs: bool = True
    paged_kernel: bool = True  # the Triton decode kernel where it can run (else gather)
    max_graph_batch: int = 512
    # Whole-process cap as a fraction of the card (0: none): weights + activations + KV.
    gpu_memory_fraction: float = 0.0


@dataclass
class MemoryPlan:
    """How the KV pool was sized (bytes); logged and reported in the stats."""

    weights: int
    activation_peak: int
    free_after_profile: int
    kv_bytes: int
    num_blocks: int
    seconds: float
    # The largest pool this worker's share of the device could hold with nothing else on
    # it (its budget, when one was set): a pool sized small because other processes held
    # the memory may grow to it (CPU: the pool itself).
    capacity_blocks: int = 0


class _DecodeGraph:
    """One captured decode step for ``batch`` rows over ``blocks`` blocks each."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits


class ModelRunner:
    """Runs steps of the engine core on one device."""

    def __init__(self, weights: LlamaWeights, device: torch.device, config: RunnerConfig) -> None:
        self.weights = weights
        self.device = device
        self.config = config
        self.shape = weights.shape
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-self.shape.max_positions // self.block_size)
        self.cache: KVCache | None = None
        self.memory: MemoryPlan | None = None
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool: Any = None  # a CUDA graph memory pool handle
        self._static: dict[str, torch.Tensor] = {}
        self.kernel = config.paged_kernel and triton_available(device)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token(self.weights.dtype)

    @property
    def num_blocks(self) -> int:
        return 0 if self.cache is None else self.cache.scratch_block

    # -- memory ---------------------------------------------------------------------------

    def allocate(self, kv_budget_bytes: int | None = None) -> MemoryPlan:
        """(Re)size the KV cache: profile on a GPU, then allocate; returns the plan."""
        started = time.perf_counter()
        self.release_cache()
        budget = self.config.kv_budget_bytes if kv_budget_bytes is None else kv_budget_bytes
        weights = _weight_bytes(self.weights)
        if self.on_cuda:
            peak, free = self._profile()
            kv_bytes = self._cuda_kv_bytes(weights, peak, free, budget)
        else:
            peak, free = 0, 0
            kv_bytes = budget or CPU_DEFAULT_KV_BYTES
        block_bytes = self.kv_bytes_per_token * self.block_size
        num_blocks = max(1, kv_bytes // block_bytes)
        self.cache = KVCache.allocate(
            self.shape, num_blocks, self.block_size, self.weights.dtype, self.device
        )
        self._make_static_buffers()
        capacity = self._cuda_kv_bytes(weights, peak, None, budget) if self.on_cuda else kv_bytes
        self.memory = MemoryPlan(
            weights, peak, free, num_blocks * block_bytes, num_blocks,
            time.perf_counter() - started, max(num_blocks, capacity // block_bytes),
        )  # fmt: skip
        log.info(
            "KV pool: %d blocks of %d tokens = %.0f MiB (%d tokens); weights %.0f MiB, "
            "activation peak %.0f MiB",
            num_blocks, self.block_size, self.memory.kv_bytes / MIB,
            num_blocks * self.block_size, weights / MIB, peak / MIB,
        )  # fmt: skip
        return self.memory

    def resize(self, num_blocks: int, moves: dict[int, int], kept: list[int]) -> float:
        """Resize the KV pool in place (see ``KVCache.resize``), dropping the graphs that
        pointed into it (they are captured again as needed); the seconds it took."""
        assert self.cache is not None and self.memory is not None
        started = time.perf_counter()
        self._graphs.clear()
        self._graph_pool = None
        # A resize hands memory to the driver (empty_cache): the allocator's cached
        # activation blocks would go too, and another process could take them. Held here,
        # they come back to this process's cache afterwards.
        reserve = self._hold_activation_memory()
        try:
            self.cache.resize(num_blocks, moves, kept)
        finally:
            del reserve
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        self.memory.num_blocks = num_blocks
        self.memory.kv_bytes = num_blocks * self.block_size * self.kv_bytes_per_token
        return time.perf_counter() - started

    def _hold_activation_memory(self) -> torch.Tensor | None:
        """What this process's allocator already caches for activations (up to the
        profiled peak), held; never memory newly taken from the driver."""
        if not self.on_cuda or self.memory is None or not self.memory.activation_peak:
            return None
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        size = min(self.memory.activation_peak, int(cached) // 2)  # fragmented: not all of it
        if size <= 0:
            return None
        reserved = torch.cuda.memory_reserved(self.device)
        try:
            held = torch.empty(size, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            return None  # already fragmented or taken: the OOM guard covers the steps
        if torch.cuda.memory_reserved(self.device) > reserved:
            return None  # no cached block was large enough: the resize returns this one
        return held

    def remake(self, budget_bytes: int) -> int:
        """Drop the pool (its contents: the caller preempted every sequence) and make a new
        one of at most ``budget_bytes`` that fits the device now; its blocks. The last
        resort of a resize that could not get its memory."""
        assert self.memory is not None
        self._drop_cache(collect=False)  # no gc pass: the memory is wanted at once
        if self.on_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget_bytes = min(budget_bytes, int(free) - self.memory.activation_peak)
        block_bytes = self.kv_bytes_per_token * self.block_size
        num_blocks = max(1, budget_bytes // block_bytes)
        self.cache = KVCache.allocate(
            self.shape, num_blocks, self.block_size, self.weights.dtype, self.device
        )
        self.memory.num_blocks = num_blocks
        self.memory.kv_bytes = num_blocks * block_bytes
        return num_blocks

    def room_for_kv_bytes(self) -> int | None:
        """The largest pool the device could hold now (None on CPU: no bound known)."""
        if not self.on_cuda or self.cache is None or self.memory is None:
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free) + self.cache.nbytes - self.memory.activation_peak

    def release_cache(self) -> None:
        """Drop the cache, the graphs that point into it and their static inputs, and
        hand memory back."""
        self._static.clear()
        self._drop_cache(collect=True)

    def _drop_cache(self, collect: bool) -> None:
        self._graphs.clear()
        self._graph_pool = None
        self.cache = None
        if collect:
            gc.collect()
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _cuda_kv_bytes(self, weights: int, peak: int, free: int | None, budget: int) -> int:
        """The pool's bytes: what is ``free`` less the activation peak, capped at this
        worker's share of the card and at ``budget``; ``free`` None: as if nothing else
        held any of the card (its capacity)."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        available = (total if free is None else free) - peak
        if self.config.gpu_memory_fraction > 0:
            available = min(
                available, int(total * self.config.gpu_memory_fraction) - weights - peak
            )
        if budget:
            available = min(available, budget)
        return max(available, self.kv_bytes_per_token * self.block_size)

    def _profile(self) -> tuple[int, int]:
        """(bytes to keep free for activations, free bytes after the profiling pass).

        The largest prefill step and the largest decode step run once on a scratch cache;
        their peaks are kept free: the prefill's twice (eager steps vary in shape), the
        decode's four times (the graphs' private pool, its eager warm-up, the sampler's
        fp32 logits), plus a margin of 4 % of the card (cuBLAS workspaces, fragmentation).
        """
        torch.cuda.synchronize(self.device)
        tokens = min(self.config.max_batched_tokens, self.shape.max_positions)
        rows = self.config.max_graph_batch  # graphs are captured up to it, whatever the limits
        blocks = max(-(-tokens // self.block_size), self.max_blocks_per_seq) + 1
        self.cache = KVCache.allocate(
            self.shape, blocks, self.block_size, self.weights.dtype, self.device
        )
        with torch.inference_mode():
            prefill = self._peak_of(lambda: self._profile_prefill(tokens))
            decode = self._peak_of(lambda: self._profile_decode(rows))
        self.cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        keep = 2 * prefill + 4 * decode + int(0.04 * total)
        log.info("profile: prefill of %d tokens peaks at %.0f MiB, decode of %d rows at %.0f MiB",
                 tokens, prefill / MIB, rows, decode / MIB)  # fmt: skip
        return keep, int(free)

    def _peak_of(self, run: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def _profile_prefill(self, tokens: int) -> None:
        chunk = Chunk(_ProfileSeq(tokens, self.block_size), 0, tokens)  # type: ignore[arg-type]
        self._prefill_logits([chunk])

    def _profile_decode(self, rows: int) -> None:
        assert self.cache is not None
        table = torch.arange(self.max_blocks_per_seq, device=self.device)
        tables = table.unsqueeze(0).expand(rows, -1).contiguous()
        lens = torch.full((rows,), self.max_blocks_per_seq * self.block_size, device=self.device)
        ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        slots = torch.zeros(rows, dtype=torch.long, device=self.device)
        attend = self._decode_attention(tables, lens)
        forward(self.weights, self.cache, ids, ids, slots, attend, None)

    def _decode_attention(self, tables: torch.Tensor, lens: torch.Tensor) -> DecodeAttention:
        if self.kernel:
            return DecodeAttention(tables, lens, kernel=True)
        return DecodeAttention(tables, lens, _length_mask(lens, tables.shape[1] * self.block_size))

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, sampling: Callable[[list[Chunk]], SamplingBatch]
    ) -> list[int]:
        """Run one step; the sampled token of every chunk that samples, in plan order."""
        logits: list[torch.Tensor] = []
        chosen: list[Chunk] = []
        if plan.decodes:
            rows = [i for i, c in enumerate(plan.decodes) if c.samples]
            decoded = self._decode_logits(plan.decodes)
            logits.append(decoded[rows] if len(rows) < len(plan.decodes) else decoded)
            chosen += [plan.decodes[i] for i in rows]
        if plan.prefills:
            logits.append(self._prefill_logits(plan.prefills))
            chosen += [c for c in plan.prefills if c.samples]
        if not chosen:
            return []
        merged = logits[0] if len(logits) == 1 else torch.cat(logits)
        return sample(merged, sampling(chosen)).tolist()

    @torch.inference_mode()
    def decode_steps(
        self, chunks: list[Chunk], steps: int, sampling: SamplingBatch
    ) -> list[list[int]]:
        """``steps`` decode steps back to back on the device, each feeding its sampled ids
        to the next without a host round trip; the ids of every step, per chunk.

        Every chunk must be a decode whose blocks already hold ``start + steps`` tokens.
        """
        assert self.cache is not None
        rows = len(chunks)
        blocks = _bucket_blocks(
            max(len(c.seq.block_table) for c in chunks), self.max_blocks_per_seq
        )
        graphs = self.on_cuda and self.config.cuda_graphs
        bucket = _bucket(rows, self.config.max_graph_batch) if graphs else None
        host = _DecodeInputs.build(chunks, bucket or rows, blocks, self.block_size, self.cache)
        slots = _future_slots(host, rows, steps, self.block_size).to(self.device, non_blocking=True)
        if bucket is not None:
            inputs = self._load_static(host, bucket, blocks)
            graph = self._graphs.get((bucket, blocks)) or self._capture(bucket, blocks)
        else:
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        chosen: list[torch.Tensor] = []
        for i in range(steps):
            if i:
                _advance(inputs, rows, chosen[-1], slots[i])
            if bucket is not None:
                graph.graph.replay()
                logits = graph.logits[:rows]
            else:
                logits = self._forward_decode(inputs)
            chosen.append(sample(logits, sampling.at_step(i)))
        return torch.stack(chosen).tolist()

    def _forward_decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.cache is not None
        attend = self._decode_attention(t["tables"], t["lens"])
        return forward(self.weights, self.cache, t["ids"], t["positions"], t["slots"], attend, None)

    def _prefill_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits of the chunks that sample (their last token), in chunk order."""
        assert self.cache is not None
        inputs = _PrefillInputs.build(chunks, self.block_size, self.cache.scratch_block)
        t = inputs.tensors(self.device)
        groups = self.shape.num_heads // self.shape.num_kv_heads
        attend = PrefillAttention([lay.attention(self.device, groups) for lay in inputs.layouts])
        return forward(
            self.weights, self.cache, t["ids"], t["positions"], t["slots"], attend, t["last"]
        )

    def _decode_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits ``[len(chunks), vocab]`` of one token per sequence."""
        blocks = _bucket_blocks(
            max(len(c.seq.block_table) for c in chunks), self.max_blocks_per_seq
        )
        rows = len(chunks)
        bucket = _bucket(rows, self.config.max_graph_batch)
        if not (self.on_cuda and self.config.cuda_graphs) or bucket is None:
            return self._decode_eager(chunks, blocks)
        self._fill_static(chunks, bucket, blocks)
        graph = self._graphs.get((bucket, blocks)) or self._capture(bucket, blocks)
        graph.graph.replay()
        return graph.logits[:rows]

    def _decode_eager(self, chunks: list[Chunk], blocks: int) -> torch.Tensor:
        assert self.cache is not None
        host = _DecodeInputs.build(chunks, len(chunks), blocks, self.block_size, self.cache)
        t = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        attend = self._decode_attention(t["tables"], t["lens"])
        return forward(self.weights, self.cache, t["ids"], t["positions"], t["slots"], attend, None)

    # -- CUDA graphs ----------------------------------------------------------------------

    def _make_static_buffers(self) -> None:
        if not (self.on_cuda and self.config.cuda_graphs):
            return
        rows = min(self.config.max_graph_batch, max(BATCH_BUCKETS))
        dev = self.device
        self._static = {
            "ids": torch.zeros(rows, dtype=torch.long, device=dev),
            "positions": torch.zeros(rows, dtype=torch.long, device=dev),
            "slots": torch.zeros(rows, dtype=torch.long, device=dev),
            "tables": torch.zeros(rows, self.max_blocks_per_seq, dtype=torch.long, device=dev),
            "lens": torch.ones(rows, dtype=torch.long, device=dev),
            "logits": torch.zeros(rows, self.shape.vocab, dtype=self.weights.dtype, device=dev),
        }

    def _fill_static(self, chunks: list[Chunk], bucket: int, blocks: int) -> None:
        assert self.cache is not None
        host = _DecodeInputs.build(chunks, bucket, blocks, self.block_size, self.cache)
        self._load_static(host, bucket, blocks)

    def _load_static(
        self, host: dict[str, torch.Tensor], bucket: int, blocks: int
    ) -> dict[str, torch.Tensor]:
        """Copy a step's inputs into the graphs' static buffers; the views written."""
        views = {}
        for name, values in host.items():
            target = self._static[name]  # "logits" is written by the graph, not here
            view = target[:bucket, :blocks] if name == "tables" else target[:bucket]
            view.copy_(values, non_blocking=True)
            views[name] = view
        return views

    def _capture(self, bucket: int, blocks: int) -> _DecodeGraph:
        assert self.cache is not None
        started = time.perf_counter()
        s = self._static
        tables = s["tables"][:bucket, :blocks]
        cache, weights = self.cache, self.weights

        def step() -> torch.Tensor:
            attend = self._decode_attention(tables, s["lens"][:bucket])
            logits = forward(
                weights, cache, s["ids"][:bucket], s["positions"][:bucket],
                s["slots"][:bucket], attend, None,
            )  # fmt: skip
            # Every graph writes one shared buffer: no graph keeps its own logits alive.
            return s["logits"][:bucket].copy_(logits)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()  # warm-up outside the graph (kernel selection, workspace allocation)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = step()
        captured = _DecodeGraph(graph, logits)
        self._graphs[(bucket, blocks)] = captured
        log.info("captured decode graph batch %d x %d blocks in %.0f ms",
                 bucket, blocks, 1000 * (time.perf_counter() - started))  # fmt: skip
        return captured

    def capture_all(self, max_rows: int, max_context: int) -> int:
        """Capture every graph up to these sizes now (a warm-up, so serving never waits)."""
        if not (self.on_cuda and self.config.cuda_graphs):
            return 0
        limit = min(max_rows, self.config.max_graph_batch)
        top = _bucket_blocks(-(-max_context // self.block_size), self.max_blocks_per_seq)
        count = 0
        with torch.inference_mode():
            for rows in sorted((b for b in BATCH_BUCKETS if b <= limit), reverse=True):
                for blocks in _block_buckets(top):
                    if (rows, blocks) not in self._graphs:
                        # The static buffers still hold the last step's slots and tables,
                        # which may point past a pool shrunk since: capture on padding.
                        self._fill_static([], rows, blocks)
                        self._capture(rows, blocks)
                        count += 1
        return count


@dataclass
class _ProfileSeq:
    """A stand-in sequence for the profiling pass: ``tokens`` zeros in the first blocks."""

    tokens: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.tokens

    @property
    def block_table(self) -> list[int]:
        return list(range(-(-self.tokens // self.block_size)))

    def token_ids(self, start: int, end: int) -> list[int]:
        return [0] * (end - start)


def _weight_bytes(weights: LlamaWeights) -> int:
    tensors = [weights.embed, weights.lm_head, weights.norm]
    for layer in weights.layers:
        tensors += [layer.input_norm, layer.post_norm]
        for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
            tensors += [w for w, _ in proj.parts]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _bucket(rows: int, limit: int) -> int | None:
    """The smallest captured batch size that holds ``rows`` (None: run eagerly)."""
    index = bisect.bisect_left(BATCH_BUCKETS, rows)
    if index == len(BATCH_BUCKETS) or BATCH_BUCKETS[index] > max(limit, 1):
        return None
    return BATCH_BUCKETS[index]


def _block_buckets(top: int) -> list[int]:
    buckets, size = [], 4
    while size < top:
        buckets.append(size)
        size *= 2
    return [*buckets, top]


def _bucket_blocks(blocks: int, most: int) -> int:
    """Context buckets in blocks: powers of two from 4, capped at the model's context."""
    size = 4
    while size < blocks:
        size *= 2
    return min(size, most)


def _future_slots(
    host: dict[str, torch.Tensor], rows: int, steps: int, block_size: int
) -> torch.Tensor:
    """``[steps, width]``: the cache slot of each row's token at every step ahead."""
    tables = host["tables"].numpy()
    slots = np.repeat(host["slots"].numpy()[None, :], steps, axis=0)
    ahead = host["positions"].numpy()[:rows, None] + np.arange(steps)[None, :]
    blocks = np.take_along_axis(tables[:rows], ahead // block_size, axis=1)
    slots[:, :rows] = (blocks * block_size + ahead % block_size).T
    return torch.from_numpy(np.ascontiguousarray(slots))


def _advance(
    inputs: dict[str, torch.Tensor], rows: int, ids: torch.Tensor, slots: torch.Tensor
) -> None:
    """Move a decode step's inputs one token on, on the device (padding rows stay)."""
    inputs["ids"][:rows].copy_(ids)
    inputs["positions"][:rows].add_(1)
    inputs["lens"][:rows].add_(1)
    inputs["slots"].copy_(slots)


def _length_mask(lens: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, 1, 1, width]``: key position < the sequence's length."""
    positions = torch.arange(width, device=lens.device)
    return (positions.unsqueeze(0) < lens.unsqueeze(1)).view(lens.shape[0], 1, 1, width)


class _DecodeInputs:
    """Host tensors of a decode step, padded to ``rows`` rows and ``blocks`` blocks."""

    @staticmethod
    def build(
        chunks: list[Chunk], rows: int, blocks: int, block_size: int, cache: KVCache
    ) -> dict[str, torch.Tensor]:
        scratch = cache.scratch_block
        ids = np.zeros(rows, dtype=np.int64)
        positions = np.zeros(rows, dtype=np.int64)
        slots = np.full(rows, scratch * block_size, dtype=np.int64)
        tables = np.full((rows, blocks), scratch, dtype=np.int64)
        for i, c in enumerate(chunks):
            seq, pos = c.seq, c.start
            table = seq.block_table
            generated = seq.row.tokens
            ids[i] = (
                generated[-1] if generated and pos >= len(seq.prompt_ids) else seq.prompt_ids[pos]
            )
            positions[i] = pos
            slots[i] = table[pos // block_size] * block_size + pos % block_size
            tables[i, : len(table)] = table
        lens = positions + 1
        lens[len(chunks) :] = 1
        return {
            "ids": torch.from_numpy(ids),
            "positions": torch.from_numpy(positions),
            "slots": torch.from_numpy(slots),
            "lens": torch.from_numpy(lens),
            "tables": torch.from_numpy(tables),
        }


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on ``device`` (copied without waiting)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class _Layout:
    """One group of a prefill step's chunks, padded for attention (host lists)."""

    tokens: list[int]
    tables: list[list[int]]
    pad_index: list[list[int]]
    valid: list[int]
    starts: list[int]
    lengths: list[int]
    width: int
    context: int

    @classmethod
    def build(
        cls, placed: list[tuple[Chunk, int]], total: int, block_size: int, scratch: int
    ) -> _Layout:
        """``placed``: each chunk with the packed index of its first token."""
        width = max(c.length for c, _ in placed)
        blocks = max(-(-(c.start + c.length) // block_size) for c, _ in placed)
        layout = cls([], [], [], [], [c.start for c, _ in placed],
                     [c.length for c, _ in placed], width, blocks * block_size)  # fmt: skip
        for row, (c, first) in enumerate(placed):
            table = c.seq.block_table[:blocks]
            layout.tokens += range(first, first + c.length)
            layout.tables.append(table + [scratch] * (blocks - len(table)))
            padding = [total] * (width - c.length)
            layout.pad_index.append(list(range(first, first + c.length)) + padding)
            layout.valid += range(row * width, row * width + c.length)
        return layout

    def attention(self, device: torch.device, groups: int) -> ChunkAttention:
        def put(values: list) -> torch.Tensor:
            return _on_device(values, device)

        fresh = not any(self.starts)
        mask = None if fresh else self._mask(put(self.starts), put(self.lengths), device, groups)
        cu = None
        if fresh and device.type == "cuda":
            offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
            cu = torch.from_numpy(offsets).to(device, non_blocking=True)
        return ChunkAttention(put(self.tokens), put(self.tables), put(self.pad_index),
                              put(self.valid), mask, fresh, cu)  # fmt: skip

    def _mask(
        self, starts: torch.Tensor, lengths: torch.Tensor, device: torch.device, groups: int
    ) -> torch.Tensor:
        """``[B, 1, groups * Lq, L]``: causal from each chunk's start, within its end."""
        query = starts.unsqueeze(1) + torch.arange(self.width, device=device).unsqueeze(0)
        keys = torch.arange(self.context, device=device).view(1, 1, -1)
        end = (starts + lengths).view(-1, 1, 1)
        mask = (keys <= query.unsqueeze(2)) & (keys < end)
        return mask.unsqueeze(1).repeat(1, 1, groups, 1)


@dataclass
class _PrefillInputs:
    """Host lists of a prefill step: packed tokens, and the attention layout of the chunks
    that start their sequence apart from those that continue one."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    last: list[int]
    layouts: list[_Layout]

    @classmethod
    def build(cls, chunks: list[Chunk], block_size: int, scratch: int) -> _PrefillInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        placed: list[tuple[Chunk, int]] = []
        for c in chunks:
            first = len(ids)
            table = c.seq.block_table
            span = range(c.start, c.start + c.length)
            ids += c.seq.token_ids(c.start, c.start + c.length)
            positions += span
            slots += [table[p // block_size] * block_size + p % block_size for p in span]
            placed.append((c, first))
            if c.samples:
                last.append(first + c.length - 1)
        groups = [[p for p in placed if p[0].start == 0], [p for p in placed if p[0].start]]
        layouts = [_Layout.build(g, len(ids), block_size, scratch) for g in groups if g]
        return cls(ids, positions, slots, last, layouts)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        def put(values: list) -> torch.Tensor:
            return _on_device(values, device)

        return {
            "ids": put(self.ids),
            "positions": put(self.positions),
            "slots": put(self.slots),
            "last": put(self.last),
        }
