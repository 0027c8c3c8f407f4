"""The systems AEGIS is compared with, run on the same model, requests and device.

* :func:`hf_static` - Hugging Face ``model.generate`` on fixed-size FIFO batches with left
  padding: eager (the seed's "static configuration"), or with ``cache_implementation=
  "static"``, which ``generate`` compiles with torch.compile on a GPU. For the static
  cache every batch is padded to one width and one size, so it compiles once.
  ``guard=False`` is a static server: an OOM fails the batch's requests (``crashed``).
* :func:`continuous_batching` - transformers' continuous batching manager
  (``attn_implementation="paged|sdpa"``), all requests submitted at once.

EOS is ignored everywhere (the loaded model's generation config has no EOS id, and the
manager gets ``-1``), so every row runs to its budget; only the tokens each request asked
for are counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from experiments.context import Bar
from experiments.measure import RunResult, peak_bytes, reset_peak, sync, timed
from services.worker.model import LoadedModel
from services.worker.oom import OomInjector, is_oom
from services.worker.precision import free_memory
from shared.schemas import GenerationRequest

log = logging.getLogger(__name__)

CB_ATTN = "paged|sdpa"
OnBatch = Callable[[int, float], None]  # (requests done, seconds since start)


def warm_up(loaded: LoadedModel) -> None:
    """One short generate, so CUDA/cuBLAS initialisation is never timed."""
    ids = torch.ones((2, 8), dtype=torch.long, device=loaded.device)
    config = _config(loaded, 4, static=False, compile_ok=False)
    with torch.inference_mode():
        _model(loaded).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    sync(loaded.device)


def hf_static(
    loaded: LoadedModel,
    requests: Sequence[GenerationRequest],
    batch_size: int,
    system: str = "hf_eager",
    static_cache: bool = False,
    compile_ok: bool = True,
    fault: OomInjector | None = None,
    bar: Bar | None = None,
    on_batch: OnBatch | None = None,
    shape_of: Sequence[GenerationRequest] | None = None,
) -> RunResult:
    """Fixed batches of ``batch_size`` in arrival order; OOMs fail their batch.

    ``on_batch(answered, seconds)`` runs after every batch; ``extra['timeline']`` holds
    ``[seconds since start, tokens]`` per batch.

    With ``static_cache`` all batches share one width (the longest prompt), one budget
    (the largest ``max_tokens``) and one row count (the last batch is filled with copies),
    so a compiled decode step is reused; ``shape_of`` takes that shape from other
    requests (a warm-up on a few requests that compiles for the whole set).
    """
    result = RunResult(system, len(requests), batch_size=batch_size)
    shaped = shape_of or requests
    width = max(r.prompt_len for r in shaped) if static_cache else None
    max_new = max(r.params.max_tokens for r in shaped) if static_cache else None
    timeline: list[list[float]] = []
    reset_peak(loaded.device)
    with timed(loaded.device) as clock:
        began = time.perf_counter()
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            batch_began = time.perf_counter() - began
            rows = chunk + [chunk[-1]] * (batch_size - len(chunk)) if static_cache else chunk
            useful = _static_batch(
                loaded, rows, chunk, width, max_new, static_cache, compile_ok, fault
            )
            if useful is None:  # out of memory: this batch's requests are lost
                result.oom_events += 1
                result.failed += len(chunk)
                result.crashed = True
                free_memory()  # outside the except block: its frames held the tensors
                useful = 0
            else:
                result.tokens += useful
                result.completed += len(chunk)
            sync(loaded.device)
            elapsed = time.perf_counter() - began
            timeline.append([round(batch_began, 4), round(elapsed, 4), useful])
            if bar is not None:
                bar.update(len(chunk))
            if on_batch is not None:
                on_batch(start + len(chunk), elapsed)
    result.seconds = clock[0]
    result.extra["timeline"] = timeline
    result.peak_memory_bytes = peak_bytes(loaded.device)
    return result


def _static_batch(
    loaded: LoadedModel,
    rows: list[GenerationRequest],
    chunk: list[GenerationRequest],
    width: int | None,
    max_new: int | None,
    static_cache: bool,
    compile_ok: bool,
    fault: OomInjector | None,
) -> int | None:
    """Useful tokens of one batch (``chunk`` = its real rows), or None on OOM."""
    try:
        tokens = _generate(loaded, rows, width, max_new, static_cache, compile_ok, fault)
    except Exception as exc:
        if not is_oom(exc):
            raise
        log.warning("static batch of %d: OOM: %s", len(rows), str(exc)[:200])
        return None
    return sum(min(t, r.params.max_tokens) for t, r in zip(tokens, chunk, strict=False))


def _generate(
    loaded: LoadedModel,
    rows: list[GenerationRequest],
    width: int | None,
    max_new: int | None,
    static_cache: bool,
    compile_ok: bool,
    fault: OomInjector | None,
) -> list[int]:
    """Generated tokens per row of one batch."""
    width = width or max(r.prompt_len for r in rows)
    new = max_new or max(r.params.max_tokens for r in rows)
    if fault is not None:
        fault.maybe_raise(len(rows), len(rows) * (width + new), step=0)
    pad = loaded.pad_token_id
    ids = [[pad] * (width - r.prompt_len) + r.prompt_token_ids for r in rows]
    mask = [[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in rows]
    device = loaded.device
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    attention = torch.tensor(mask, dtype=torch.long, device=device)
    config = _config(loaded, new, static=static_cache, compile_ok=compile_ok)
    with torch.inference_mode():
        out = _model(loaded).generate(
            input_ids=input_ids, attention_mask=attention, generation_config=config
        )
    generated = int(out.shape[1]) - width
    return [generated] * len(rows)


def _config(loaded: LoadedModel, new: int, static: bool, compile_ok: bool) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=new,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,  # EOS ignored: every row generates exactly ``new`` tokens
        pad_token_id=loaded.pad_token_id,
        use_cache=True,
        cache_implementation="static" if static else None,
        disable_compile=not compile_ok,
    )


def _model(loaded: LoadedModel) -> Any:
    return loaded.model  # generate() and the CB API are untyped in transformers


def continuous_batching(
    loaded: LoadedModel,
    requests: Sequence[GenerationRequest],
    system: str = "hf_continuous_batching",
) -> RunResult:
    """All requests through transformers' continuous batching manager at once.

    On a GPU the manager sizes its paged cache itself and captures CUDA graphs in a
    warm-up that is not timed; on CPU it gets a small fixed cache (its automatic
    sizing probes GPU memory and takes minutes there).
    """
    from transformers.generation.continuous_batching.utils import WorkloadHints

    model = _model(loaded)
    original = model.config._attn_implementation
    model.set_attn_implementation(CB_ATTN)
    result = RunResult(system, len(requests))
    hints = WorkloadHints(
        max_prompt_length=max(r.prompt_len for r in requests),
        max_generated_length=max(r.params.max_tokens for r in requests),
        num_requests=len(requests),
    )
    cuda = loaded.device.startswith("cuda")
    config = _config(loaded, hints.max_generated_length, static=False, compile_ok=False)
    config.eos_token_id = -1  # the manager's own "no EOS" value (it warns about None)
    reset_peak(loaded.device)
    try:
        with model.continuous_batching_context_manager(
            generation_config=config,
            continuous_batching_config=_cb_config(requests, cuda),
            block=True,
            timeout=10,
            warmup=cuda,
            workload_hints=hints,
        ) as manager:
            _collect(manager, requests, result, loaded.device)
    finally:
        model.set_attn_implementation(original)
        free_memory()  # the manager's paged cache (most of the GPU by default)
    result.peak_memory_bytes = peak_bytes(loaded.device)
    result.extra = {"attn_implementation": CB_ATTN, "warmup_untimed": cuda}
    return result


def _cb_config(requests: Sequence[GenerationRequest], cuda: bool) -> Any:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if cuda:
        return ContinuousBatchingConfig()
    longest = max(r.prompt_len + r.params.max_tokens for r in requests)
    block = 32
    blocks = max(64, 2 * len(requests) * (longest // block + 1))
    return ContinuousBatchingConfig(
        block_size=block,
        num_blocks=blocks,
        max_batch_tokens=max(256, longest * 2),
        use_cuda_graph=False,
        use_async_batching=False,
    )


def _collect(
    manager: Any, requests: Sequence[GenerationRequest], result: RunResult, device: str
) -> None:
    budget = {r.id: r.params.max_tokens for r in requests}
    sync(device)
    start = time.perf_counter()
    for r in requests:
        manager.add_request(r.prompt_token_ids, request_id=r.id, max_new_tokens=r.params.max_tokens)
    done = 0
    while done < len(requests):
        output = manager.get_result(timeout=1)
        if output is None:
            if not manager.is_running():
                break
            continue
        if not output.is_finished():
            continue
        done += 1
        if output.error:
            result.failed += 1
            continue
        result.completed += 1
        result.tokens += min(len(output.generated_tokens), budget.get(output.request_id, 0))
    sync(device)
    result.seconds = time.perf_counter() - start
    result.failed += len(requests) - done
