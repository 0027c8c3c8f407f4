"""The one logging setup: concise lines or JSON, level from config, no stacked handlers."""

from __future__ import annotations

import json
import logging

import pytest

from shared.config import CommonSettings
from shared.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_level_logger_message_and_exception(capsys) -> None:
    setup_logging("INFO", json_output=True, service="worker")
    log = logging.getLogger("services.worker.test")
    log.info("cycle %d: batch %d", 3, 16)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "cycle 3: batch 16" and lines[0]["level"] == "INFO"
    assert lines[0]["logger"] == "services.worker.test" and lines[0]["ts"].endswith("Z")
    assert lines[1]["level"] == "ERROR" and "RuntimeError: boom" in lines[1]["exc"]


def test_level_from_settings_filters_and_setup_does_not_stack_handlers(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AEGIS_LOG_LEVEL", "warning")
    settings = CommonSettings()
    setup_logging(settings.log_level, settings.log_json, "agent")
    setup_logging(settings.log_level, settings.log_json, "agent")
    log = logging.getLogger("services.agent.test")
    log.info("hidden")
    log.warning("shown %s", "once")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert err.count("shown once") == 1 and " W agent services.agent.test: " in err


def test_a_bad_log_level_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEGIS_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="log_level"):
        CommonSettings()
