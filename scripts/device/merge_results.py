"""Merge the results.json of several benchmark runs (e.g. one per GPU of a machine, or a
re-run of one scenario) into one folder: results.json, results.md and the PNGs.

    python scripts/device/merge_results.py --out results/NAME run1/results.json run2/...

A later file's scenario replaces an earlier one's. ``meta.parts`` records, per scenario,
the run it came from (commit, date, card), so mixed commits stay visible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments import report


def merge(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"meta": {}, "config": {}, "scenarios": {}}
    parts: dict[str, dict[str, Any]] = {}
    for path in paths:
        run = json.loads(path.read_text())
        meta = run["meta"]
        merged["meta"] = {**merged["meta"], **meta}
        merged["config"] = {**merged["config"], **run.get("config", {})}
        earlier = meta.get("parts", {})  # a merged file keeps each scenario's own run
        for name, data in run["scenarios"].items():
            merged["scenarios"][name] = data
            if name in earlier:
                parts[name] = earlier[name]
                continue
            parts[name] = {k: meta.get(k) for k in ("git_commit", "date", "card")}
            parts[name]["source"] = str(path)
    commits = {c[:8] for p in parts.values() for c in (p["git_commit"] or "").split(", ") if c}
    merged["meta"]["git_commit"] = ", ".join(sorted(commits))
    merged["meta"]["parts"] = parts
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    merged = merge(args.results)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    for path in report.write(merged, args.out):
        print(path)


if __name__ == "__main__":
    main()
