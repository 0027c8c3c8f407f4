"""The worker tests' model: ``synthetic:tiny`` on one CPU thread, loaded once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from services.worker.model import LoadedModel, load_model


@pytest.fixture(scope="module")
def tiny() -> Iterator[LoadedModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("synthetic:tiny", "cpu", "fp32")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tiny: LoadedModel) -> LoadedModel:
    """The same model, under the name the engine tests read best with."""
    return tiny
