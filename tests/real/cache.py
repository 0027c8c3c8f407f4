"""Where tests keep the converted packaged model, shared by every test that loads it."""

from __future__ import annotations

from pathlib import Path

import pytest


def shared_model_cache(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache in pytest's cache dir: the packaged GGUF is dequantised once per checkout
    (about 20 s on a small CPU), not once per test module or run."""
    cache = getattr(config, "cache", None)
    if cache is None:  # run with -p no:cacheprovider
        return tmp_path_factory.getbasetemp() / "aegis-models"
    return Path(cache.mkdir("aegis-models"))
