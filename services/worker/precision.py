"""Changing a loaded model's precision between batches.

fp32 / bf16 / fp16 are a ``model.to(dtype)``. Downcasting rounds the weights, and
upcasting again does not restore them: the values stay the rounded ones (exact for a
round trip through one 16-bit type). int8 is weight-only quantization through torchao
when it is installed; it cannot be undone in place, so leaving int8 reloads the weights
(a synthetic model is rebuilt bit-identically from its seed).

Errors: :class:`PrecisionUnavailable` (e.g. "int8 needs torchao", bf16 on a GPU
without it); the model is left as it was.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from typing import cast, get_args

import torch

from services.worker import model as model_mod
from services.worker.model import DTYPES, LoadedModel
from shared.schemas import Precision

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = get_args(Precision)


class PrecisionUnavailable(Exception):
    """The requested precision can't be used here; nothing was changed."""


@dataclass(frozen=True)
class PrecisionChange:
    """What a precision change did, with memory measured before and after.

    ``measure`` is ``cuda_allocated`` (``torch.cuda.memory_allocated``) on a GPU, else
    ``parameter_bytes`` (bytes of the model's parameters and buffers).
    """

    before: Precision
    after: Precision
    bytes_before: int
    bytes_after: int
    seconds: float
    measure: str
    reloaded: bool = False

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def describe(self) -> str:
        """One line for logs: the memory change and how it was measured."""
        mib = 1024 * 1024
        how = "reloaded, " if self.reloaded else ""
        return (
            f"{self.bytes_before / mib:.1f} -> {self.bytes_after / mib:.1f} MiB "
            f"(saved {self.bytes_saved / mib:.1f} MiB; {how}{self.measure}, {self.seconds:.2f} s)"
        )


def int8_support() -> tuple[bool, str]:
    """Whether int8 weight-only quantization is usable here, and why not if not."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return False, f"int8 needs torchao ({type(exc).__name__}: {exc})"
    return True, "torchao available"


def check_precision(precision: str, device: str) -> None:
    """Raise :class:`PrecisionUnavailable` when ``precision`` can't run on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionUnavailable(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "int8":
        usable, why = int8_support()
        if not usable:
            raise PrecisionUnavailable(why)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PrecisionUnavailable("bf16 is not supported by this GPU")


def apply_precision(loaded: LoadedModel, target: Precision) -> PrecisionChange:
    """Convert ``loaded`` to ``target`` in place (``loaded.model`` may be replaced).

    Call it between batches only. Raises :class:`PrecisionUnavailable` and leaves the
    model untouched when ``target`` can't be used.
    """
    check_precision(target, loaded.device)
    before = loaded.precision
    start = time.perf_counter()
    bytes_before, measure = model_memory(loaded)
    reloaded = False
    if target == "int8" and before != "int8":
        _quantize_int8(loaded)
    elif before == "int8" and target != "int8":
        _reload(loaded, target)
        reloaded = True
    elif target != before:
        _module(loaded).to(DTYPES[target])
    loaded.precision = target
    bytes_after, _ = model_memory(loaded)
    change = PrecisionChange(
        before, target, bytes_before, bytes_after, time.perf_counter() - start, measure, reloaded
    )
    log.info(
        "precision %s -> %s: %d -> %d bytes (%s, %.2f s)",
        before,
        target,
        bytes_before,
        bytes_after,
        measure,
        change.seconds,
    )
    return change


def model_memory(loaded: LoadedModel) -> tuple[int, str]:
    """Memory held now: CUDA allocated bytes on a GPU, parameter bytes elsewhere."""
    if loaded.device.startswith("cuda") and torch.cuda.is_available():
        free_memory()
        return torch.cuda.memory_allocated(torch.device(loaded.device)), "cuda_allocated"
    return model_mod.parameter_bytes(loaded.model), "parameter_bytes"


def free_memory() -> None:
    """Drop unreferenced tensors and hand cached CUDA blocks back (after OOM, reloads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _quantize_int8(loaded: LoadedModel) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if loaded.device.startswith("cuda"):
        # torchao's int8 weight-only kernels expect 16-bit activations on a GPU.
        _module(loaded).to(torch.bfloat16)
    quantize_(loaded.model, Int8WeightOnlyConfig())


def _reload(loaded: LoadedModel, target: Precision) -> None:
    """Leave int8 by loading the weights again at ``target``.

    The fresh copy is loaded beside the quantized one when memory allows (a failed
    reload then leaves the model serving as it was); after an OOM, the quantized
    model is dropped first.
    """
    fresh: LoadedModel | None = None
    with contextlib.suppress(torch.OutOfMemoryError):
        fresh = _load_again(loaded, target)
    if fresh is None:
        loaded.model = None  # type: ignore[assignment]
        free_memory()
        fresh = _load_again(loaded, target)
    loaded.model = fresh.model
    free_memory()


def _load_again(loaded: LoadedModel, target: Precision) -> LoadedModel:
    try:
        return model_mod.load_model(
            loaded.source, loaded.device, target, allow_synthetic_fallback=False
        )
    except model_mod.ModelLoadError as exc:
        raise PrecisionUnavailable(f"cannot leave int8: reloading failed: {exc}") from exc


def _module(loaded: LoadedModel) -> torch.nn.Module:
    return cast(torch.nn.Module, loaded.model)
