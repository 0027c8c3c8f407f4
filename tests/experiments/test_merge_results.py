"""Merging benchmark runs keeps, per scenario, the run it came from, also when one of the
inputs is itself a merged file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).parents[2] / "scripts" / "device" / "merge_results.py"


def _merge(paths: list[Path]) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("merge_results", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result: dict[str, Any] = module.merge(paths)
    return result


def _run(path: Path, commit: str, scenarios: dict[str, Any], **meta: Any) -> Path:
    meta = {"git_commit": commit, "date": f"d-{commit}", "card": "NVIDIA H200", **meta}
    path.write_text(json.dumps({"meta": meta, "scenarios": scenarios}))
    return path


def test_a_merged_input_keeps_each_scenario_s_own_run(tmp_path: Path) -> None:
    first = _run(tmp_path / "a.json", "aaaaaaaa11", {"sweep": {"x": 1}, "system": {"x": 2}})
    second = _run(tmp_path / "b.json", "bbbbbbbb22", {"system": {"x": 3}})
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_merge([first, second])))
    third = _run(tmp_path / "c.json", "cccccccc33", {"goodput": {"x": 4}})

    merged = _merge([base, third])

    parts = merged["meta"]["parts"]
    assert parts["sweep"]["git_commit"] == "aaaaaaaa11"
    assert parts["sweep"]["source"] == str(first)
    assert parts["system"]["git_commit"] == "bbbbbbbb22"  # the later run replaced it
    assert parts["goodput"]["git_commit"] == "cccccccc33"
    assert merged["scenarios"]["system"] == {"x": 3}
    assert merged["meta"]["git_commit"] == "aaaaaaaa, bbbbbbbb, cccccccc"
