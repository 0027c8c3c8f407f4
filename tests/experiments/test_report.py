"""The report survives failed peers and scenarios, and says what failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments import report
from experiments.scenarios.common import attempt
from experiments.summary import summary_rows, summary_text


def _run(system: str, tps: float) -> dict[str, Any]:
    return {
        "system": system,
        "tokens_per_s": tps,
        "peak_memory_bytes": None,
        "note": "",
        "extra": {},
        "failed": 0,
    }


def _results() -> dict[str, Any]:
    points = [
        {
            "batch_size": b,
            "requests": b,
            "aegis": _run("aegis", 10.0 * b),
            "hf_eager": _run("hf_eager", 8.0 * b),
            "ratio_vs_eager": 1.25,
        }
        for b in (2, 4)
    ]
    return {
        "meta": {"card": "test", "scale": "tiny"},
        "scenarios": {
            "sweep": {
                "points": points,
                "static_cache": [attempt("compile", lambda: 1 / 0)],  # type: ignore[arg-type,return-value]
                "continuous_batching": {"error": "RuntimeError: no paged attention"},
            },
            "memory": {"error": "ValueError: boom", "traceback": "..."},
        },
    }


def test_attempt_turns_a_failure_into_a_record() -> None:
    assert attempt("ok", lambda: {"x": 1}) == {"x": 1}
    failed = attempt("bad", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    assert failed["error"].startswith("ZeroDivisionError")


def test_failed_peers_and_scenarios_are_reported_not_fatal(tmp_path: Path) -> None:
    results = _results()
    rows = summary_rows(results)
    assert rows == [("sweep", "tokens/s, batch 4", 40.0, "HF generate eager", 32.0, 1.25)]
    assert "1.25" in summary_text(results)
    files = report.write(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "**peer failed:** `ZeroDivisionError" in md
    assert "no paged attention" in md
    assert "## memory" in md and "**failed:** `ValueError: boom`" in md
    assert [f.name for f in files] == ["results.md", "sweep.png"]  # no plot of a failed scenario
