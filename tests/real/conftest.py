"""Real weights on CPU (fp32): the packaged SmolLM2-135M-Instruct, loaded once per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.worker.model import LoadedModel, load_model
from services.worker.packaged import PACKAGED_MODEL
from tests.real.cache import shared_model_cache


@pytest.fixture(scope="session")
def model_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_model_cache(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="module")
def smollm2(model_cache: Path) -> Iterator[LoadedModel]:
    # One thread: the box is shared, and results must not depend on how many cores it has.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(
        PACKAGED_MODEL, "cpu", "fp32", allow_synthetic_fallback=False, cache_dir=model_cache
    )
    torch.set_num_threads(threads)
