"""Loading the model a worker serves: a real checkpoint, or a synthetic stand-in.

``load_model(name, device, precision)`` accepts

* a hub id or a local directory (``from_pretrained``),
* ``smollm2-135m``: the real SmolLM2-135M-Instruct shipped as a Python package
  (:mod:`services.worker.packaged`), converted once into a checkpoint in the model cache, or
* a ``synthetic:<arch>`` name (see :data:`SYNTHETIC_CONFIGS`): the architecture built
  from its config with seeded random weights and a byte-level BPE tokenizer made
  offline. Memory and compute match the real model; the text is meaningless.

When a checkpoint cannot be had (no network, not found) and fallback is allowed, the
packaged ``smollm2-135m`` is served instead (a real, smaller model: real text), and only
where that is not installed either the synthetic model of the same architecture. Either
fallback is loud: a warning, and a name that says what it stands in for
(``LoadedModel.fallback_for``; ``LoadedModel.synthetic = True`` for random weights).

EOS is handled by the engine, not by ``generate``: the ids are kept in
``LoadedModel.eos_token_ids`` and removed from the model's generation config, so a
benchmark can ignore EOS and a row's finish reason is decided in one place.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from services.worker.packaged import PACKAGED_MODEL, packaged_checkpoint
from shared.config import CommonSettings
from shared.schemas import ModelInfo, Precision

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in Llama's tokenizer
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_LLAMA_COMMON = {
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_bias": False,
    "mlp_bias": False,
}
# TinyLlama-1.1B-Chat-v1.0's config.json, shape for shape.
SYNTHETIC_CONFIGS: dict[str, dict[str, object]] = {
    "tinyllama-1.1b": {
        **_LLAMA_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    },
    "tiny": {
        **_LLAMA_COMMON,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    },
}
# Real checkpoints whose architecture a synthetic config reproduces (lower-case match).
_FALLBACKS = {"tinyllama": "tinyllama-1.1b"}
_COMMON_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come "
    "made may part model token request batch memory GPU hello world user assistant system"
)


class ModelLoadError(Exception):
    """The model could not be loaded and no fallback applies."""


@dataclass
class LoadedModel:
    """A model ready to serve, with what was asked for and what is actually loaded.

    ``name`` is what the runtime reports (it says ``synthetic`` and, for a fallback,
    what it stands in for); ``requested`` is the name the operator configured.
    ``precision`` is kept current by :mod:`services.worker.precision`.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str
    requested: str
    synthetic: bool
    context_length: int
    device: str
    precision: Precision
    # What was loaded (hub id, path or synthetic name): lets precision changes reload.
    source: str = ""
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    # The configured name this model stands in for, when it is a fallback.
    fallback_for: str | None = None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> Precision:
    """``auto`` -> bf16 on a GPU that has it, fp16 on one that doesn't, fp32 on CPU."""
    if precision != "auto":
        if precision not in DTYPES and precision != "int8":
            raise ValueError(f"unknown precision {precision!r}")
        return precision  # type: ignore[return-value]
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_model(
    name: str,
    device: str = "cpu",
    precision: Precision = "fp32",
    allow_synthetic_fallback: bool = True,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``name`` onto ``device`` at ``precision``.

    ``allow_synthetic_fallback`` allows any fallback (the packaged model, then a synthetic
    one). ``cache_dir`` keeps converted checkpoints (default: ``AEGIS_MODEL_CACHE_DIR``).
    Raises :class:`ModelLoadError` when a real model can't be loaded and fallback is
    off, or for an unknown ``synthetic:`` name; ``PrecisionUnavailable`` for int8
    without torchao.
    """
    from services.worker.precision import apply_precision, check_precision

    device = resolve_device(device)
    check_precision(precision, device)  # fail before spending time on loading
    base: Precision = precision
    if precision == "int8":
        base = "bf16" if device.startswith("cuda") else "fp32"
    if name.startswith(SYNTHETIC_PREFIX):
        loaded = _load_synthetic(name, name, device, base)
    else:
        cache = cache_dir or CommonSettings().resolved_model_cache_dir()
        loaded = _load_real_or_fallback(name, device, base, allow_synthetic_fallback, cache)
    if precision == "int8":
        apply_precision(loaded, "int8")
    log.info(
        "model ready: %s on %s (%s, context %d, synthetic=%s)",
        loaded.name,
        loaded.device,
        loaded.precision,
        loaded.context_length,
        loaded.synthetic,
    )
    return loaded


def load_dtype(precision: Precision) -> torch.dtype:
    """The floating dtype weights are loaded in (int8 is applied after loading)."""
    return DTYPES[precision]


def _load_real_or_fallback(
    name: str, device: str, precision: Precision, allow_fallback: bool, cache: Path
) -> LoadedModel:
    try:
        return _load_real(name, device, precision, cache)
    except (OSError, ValueError) as exc:
        if not allow_fallback:
            raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
        reason = _describe(exc)
    if name != PACKAGED_MODEL:
        try:
            loaded = _load_real(PACKAGED_MODEL, device, precision, cache)
        except (OSError, ValueError) as exc:
            reason = f"{reason}; {PACKAGED_MODEL}: {_describe(exc)}"
        else:
            log.warning(
                "!!! cannot load %r (%s); serving the packaged model %s instead: REAL text "
                "from a SMALLER model (SmolLM2-135M-Instruct), not the one configured !!!",
                name,
                reason,
                PACKAGED_MODEL,
            )
            return _as_fallback(loaded, name)
    return _synthetic_fallback(name, reason, device, precision)


def _synthetic_fallback(name: str, reason: str, device: str, precision: Precision) -> LoadedModel:
    arch = synthetic_arch_for(name)
    log.warning(
        "!!! cannot load %r (%s); serving SYNTHETIC %s%s with RANDOM WEIGHTS instead: "
        "same shapes and cost, meaningless text !!!",
        name,
        reason,
        SYNTHETIC_PREFIX,
        arch,
    )
    return _as_fallback(_load_synthetic(SYNTHETIC_PREFIX + arch, name, device, precision), name)


def _as_fallback(loaded: LoadedModel, requested: str) -> LoadedModel:
    loaded.name = f"{loaded.name} (fallback for {requested})"
    loaded.requested = requested
    loaded.fallback_for = requested
    return loaded


def _describe(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"


def synthetic_arch_for(name: str) -> str:
    """The synthetic architecture that stands in for checkpoint ``name``."""
    lowered = name.lower()
    for marker, arch in _FALLBACKS.items():
        if marker in lowered:
            return arch
    return "tiny"


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the model hub answers a TCP connect: when it doesn't, loading goes straight
    to the local cache instead of spending a minute in the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _load_real(name: str, device: str, precision: Precision, cache: Path) -> LoadedModel:
    if name != PACKAGED_MODEL:
        return _load_pretrained(name, device, precision)
    # The converted checkpoint is an ordinary local folder; its path is the source, so a
    # precision change reloads it without converting again.
    loaded = _load_pretrained(str(packaged_checkpoint(cache)), device, precision)
    loaded.name = loaded.requested = PACKAGED_MODEL
    return loaded


def _load_pretrained(name: str, device: str, precision: Precision) -> LoadedModel:
    local_only = not Path(name).is_dir() and not hub_reachable()
    if local_only:
        log.info("model hub unreachable: looking for %r in the local cache only", name)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{name!r} has no fast tokenizer (got {type(tokenizer).__name__})")
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=load_dtype(precision), low_cpu_mem_usage=True, local_files_only=local_only
    )
    return _finish(
        model, tokenizer, name, name, synthetic=False, device=device, precision=precision
    )


def _load_synthetic(name: str, requested: str, device: str, precision: Precision) -> LoadedModel:
    arch = name.removeprefix(SYNTHETIC_PREFIX)
    if arch not in SYNTHETIC_CONFIGS:
        known = ", ".join(SYNTHETIC_PREFIX + key for key in SYNTHETIC_CONFIGS)
        raise ModelLoadError(f"unknown synthetic model {name!r}; known: {known}")
    config = LlamaConfig(**SYNTHETIC_CONFIGS[arch])  # type: ignore[arg-type]
    tokenizer = synthetic_tokenizer(config.vocab_size)
    # Seeded on its own generator state, so the weights never depend on what ran before;
    # built on the target device (random init of 1.1B weights on a CPU takes ~15 s).
    rng_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device):
        torch.manual_seed(SYNTHETIC_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=load_dtype(precision))
    return _finish(
        model, tokenizer, name, requested, synthetic=True, device=device, precision=precision
    )


def configure_cuda_attention() -> None:
    """Keep SDPA off its cuDNN backend (process-wide; called when a model lands on a GPU).

    cuDNN attention builds a plan per new shape, and a static batch brings a new key
    length at every decode step: measured on an H200 (synthetic TinyLlama, batch 16,
    64 new tokens), each batch of unseen prompt widths took 3.5-5.1 s with cuDNN SDPA
    and 1.3-1.5 s without it (flash / memory-efficient kernels need no plans).
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    name: str,
    requested: str,
    synthetic: bool,
    device: str,
    precision: Precision,
) -> LoadedModel:
    cast(torch.nn.Module, model).to(device)
    model.eval()
    if device.startswith("cuda"):
        configure_cuda_attention()
    eos_ids = _eos_ids(model, tokenizer)
    # The engine decides when a row ends (EOS, stop strings, max tokens); see module doc.
    model.generation_config.eos_token_id = None
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else eos_ids[0]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        requested=requested,
        synthetic=synthetic,
        context_length=int(getattr(model.config, "max_position_embeddings", 2048)),
        device=device,
        precision=precision,
        source=name,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad_id),
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    candidates: list[object] = [
        model.generation_config.eos_token_id,
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ]
    ids: list[int] = []
    for value in candidates:
        values = value if isinstance(value, list) else [value]
        ids.extend(int(v) for v in values if isinstance(v, int) and int(v) not in ids)
    return ids


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens, built offline.

    Trained on a seeded pseudo-text corpus, so it is identical on every call and every
    id a random-weight model can emit decodes to text. Special tokens are Llama's
    (``<unk>``=0, ``<s>``=1, ``</s>``=2) plus ``<pad>``=3; encoding adds ``<s>``.
    """
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_synthetic_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1_000_000,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@lru_cache(maxsize=4)
def _synthetic_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_pseudo_corpus(), trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:  # a small corpus can run out of merges: fill so every id decodes
        tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer.to_str()


def _pseudo_corpus(lines: int = 2000, words_per_line: int = 100) -> list[str]:
    rng = random.Random(SYNTHETIC_SEED)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30000)]
    vocab = _COMMON_WORDS.split() * 40 + vocab
    punctuation = [",", ".", "?", "!", "\n", " 42", " 2024", ":"]
    corpus = []
    for _ in range(lines):
        words = [rng.choice(vocab) for _ in range(words_per_line)]
        corpus.append(" ".join(words) + rng.choice(punctuation))
    return corpus


def model_info(loaded: LoadedModel) -> ModelInfo:
    """What the gateway needs to tokenize and render chat without torch."""
    tokenizer = loaded.tokenizer
    template = tokenizer.chat_template
    return ModelInfo(
        name=loaded.name,
        requested=loaded.requested,
        synthetic=loaded.synthetic,
        context_length=loaded.context_length,
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        chat_template=template if isinstance(template, str) else None,
        eos_token=_token_text(tokenizer.eos_token),
        bos_token=_token_text(tokenizer.bos_token),
        dtype=loaded.precision,
        device=loaded.device,
    )


def _token_text(token: object) -> str | None:
    return str(token) if token is not None else None


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (the CPU memory measure)."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; a wrapper subclass (torchao int8) counts its inner data."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    inner = [getattr(tensor, name) for name in names]
    return sum(tensor_bytes(t) for t in inner if isinstance(t, torch.Tensor))
