"""Two workers on one host never share an id or a metrics port (issue 9, item 7)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from services.worker.config import DEFAULT_METRICS_PORT, WorkerSettings, first_free_port


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other process listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield int(server.getsockname()[1])


def test_the_default_id_names_host_device_and_metrics_port(monkeypatch) -> None:
    monkeypatch.delenv("AEGIS_WORKER_METRICS_PORT", raising=False)
    settings = WorkerSettings(device="cuda:1")
    assert settings.worker_metrics_port >= DEFAULT_METRICS_PORT
    expected = f"{socket.gethostname()}-cuda1-{settings.worker_metrics_port}"
    assert settings.worker_id == expected


def test_an_unset_metrics_port_moves_past_a_taken_one(monkeypatch, held_port: int) -> None:
    monkeypatch.delenv("AEGIS_WORKER_METRICS_PORT", raising=False)
    assert first_free_port("127.0.0.1", held_port) > held_port
    first = WorkerSettings(device="cpu")
    with socket.create_server(("127.0.0.1", first.worker_metrics_port)):
        second = WorkerSettings(device="cpu")  # started while the first one serves
    assert second.worker_metrics_port > first.worker_metrics_port
    assert second.worker_id != first.worker_id


def test_a_set_metrics_port_that_is_taken_is_a_clear_settings_error(
    monkeypatch, held_port: int
) -> None:
    monkeypatch.setenv("AEGIS_WORKER_METRICS_PORT", str(held_port))
    with pytest.raises(ValidationError, match=f"AEGIS_WORKER_METRICS_PORT={held_port} is already"):
        WorkerSettings()


def test_an_explicit_id_and_port_are_kept(monkeypatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        free = int(probe.getsockname()[1])
    settings = WorkerSettings(worker_id="gpu-a", worker_metrics_port=free)
    assert (settings.worker_id, settings.worker_metrics_port) == ("gpu-a", free)


def test_without_metrics_the_default_id_still_differs_per_process(monkeypatch) -> None:
    monkeypatch.setenv("AEGIS_WORKER_METRICS_PORT", "0")
    settings = WorkerSettings(device="cpu")
    assert settings.worker_id.startswith(f"{socket.gethostname()}-cpu-pid")
