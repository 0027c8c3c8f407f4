"""The gateway says which event loop and HTTP parser it serves on."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from services.gateway import __main__ as gateway_main


def test_the_installed_fast_paths_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.gateway"):
        gateway_main.report_speedups()
    assert "serving on uvloop with httptools" in caplog.text  # uvicorn[standard] is installed


def test_a_missing_fast_path_is_a_warning_that_names_the_fallback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def without_httptools(name: str, *args: object) -> object:
        return None if name == "httptools" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_httptools)
    with caplog.at_level(logging.INFO, logger="services.gateway"):
        gateway_main.report_speedups()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "httptools not installed" in record.message and "h11 HTTP parser" in record.message
    assert "uvloop" not in record.message
