"""The AEGIS benchmark suite: ``python -m experiments.benchmark`` (or ``aegis bench``).

    python -m experiments.benchmark --scenario all --scale tiny --device cpu --out results/smoke
    python -m experiments.benchmark --scenario sweep,memory,adaptive,oom --scale full \
        --device cuda --out results/h100
    python -m experiments.benchmark --scenario system --scale full --device cuda \
        --out results/h100 --merge

Writes ``results.json`` (after every scenario, so a cut-off run keeps what finished),
``results.md`` and one PNG per scenario into ``--out``, and prints a summary table.
Exit status: 0 when every scenario ran, 1 when one failed (its error is recorded), 2 for
bad arguments. See experiments/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from experiments import peers, report, workloads
from experiments.context import PEERS, BenchContext
from experiments.measure import environment
from experiments.summary import summary_text

log = logging.getLogger("experiments.benchmark")

SCENARIOS = (
    "sweep",
    "bursty",
    "goodput",
    "system",
    "scaleout",
    "colocated",
    "memory",
    "adaptive",
    "elastic",
    "oom",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aegis bench", description="AEGIS benchmark suite")
    parser.add_argument(
        "--scenario", default="all", help=f"all, or a comma list of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--scale", choices=workloads.SCALES, default="tiny")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default results/<scale>-<device>)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default="", help="override the scale's model (workloads.json), e.g. a local path"
    )
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} (or 'none')"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep other scenarios of an existing results.json"
    )
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="torch.compile the static-cache peer on CPU"
    )
    parser.add_argument(
        "--git-commit", default="", help="record this commit (when the copy has no .git)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    return parser.parse_args(argv)


def scenarios_of(spec: str) -> list[str]:
    """``all`` or a comma list -> scenario names in run order; ValueError for unknown ones."""
    names = list(SCENARIOS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(
            f"unknown scenario(s) {unknown or spec!r}; use all or {', '.join(SCENARIOS)}"
        )
    return [n for n in SCENARIOS if n in names]


def peers_of(spec: str) -> tuple[str, ...]:
    names = [] if spec == "none" else [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; use {', '.join(PEERS)} or none")
    return tuple(names)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # ``aegis bench -- --scenario ...`` hands the separator on
        argv = argv[1:]
    try:
        args = parse_args(argv)
        names, chosen_peers = scenarios_of(args.scenario), peers_of(args.peers)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no GPU")
    except ValueError as exc:
        print(f"aegis bench: {exc}", file=sys.stderr)
        return 2
    _setup(args)
    ctx = BenchContext(
        scale=args.scale,
        device=device,
        out=args.out or Path("results") / f"{args.scale}-{device}",
        seed=args.seed,
        peers=chosen_peers,
        progress=not args.no_progress,
        compile_on_cpu=args.compile_on_cpu,
        model_name=args.model,
    )
    results = _start_results(ctx, args, names)
    failed = [name for name in names if not _run_one(ctx, name, results)]
    files = report.write(results, ctx.out)
    print(summary_text(results))
    print(f"\nwrote {ctx.out / 'results.json'}, " + ", ".join(str(f) for f in files))
    if failed:
        print(f"failed scenario(s): {', '.join(failed)} (see results.json)", file=sys.stderr)
    return 1 if failed else 0


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # CB's "eos_token_id not set" etc.: expected here
    except ImportError:
        pass


def _start_results(ctx: BenchContext, args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    path = ctx.out / "results.json"
    old = json.loads(path.read_text()) if args.merge and path.exists() else {}
    loaded = ctx.model()
    peers.warm_up(loaded)  # CUDA/cuBLAS start-up is timed by no scenario
    meta = {
        **environment(ctx.device),
        "scale": ctx.scale,
        "seed": ctx.seed,
        "model": ctx.model_name,
        "model_loaded": loaded.name,
        "synthetic": loaded.synthetic,
        "precision": ctx.precision,
        "argv": sys.argv[1:] if args else [],
    }
    if args.git_commit:
        meta["git_commit"] = args.git_commit
    spec = workloads.load_spec()
    config = {
        "scenarios_run": names,
        "peers": list(ctx.peers),
        "notes": spec.get("_comment", ""),
        "workloads": {w: workloads.workload(w, ctx.scale).to_dict() for w in spec["workloads"]},
        "scenarios": {s: workloads.scenario_config(s, ctx.scale) for s in names},
        "policy_overrides": workloads.policy_overrides(ctx.scale),
    }
    return {"meta": meta, "config": config, "scenarios": dict(old.get("scenarios", {}))}


def _run_one(ctx: BenchContext, name: str, results: dict[str, Any]) -> bool:
    """Run one scenario, store its data (or its error); True when it succeeded."""
    module = importlib.import_module(f"experiments.scenarios.{name}")
    start = time.perf_counter()
    print(f"[{name}] running ({ctx.scale}, {ctx.device})", file=sys.stderr, flush=True)
    ok = True
    try:
        data = module.run(ctx)
    except Exception as exc:
        log.exception("scenario %s failed", name)
        data = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
        ok = False
    data["elapsed_s"] = round(time.perf_counter() - start, 2)
    results["scenarios"][name] = data
    _save(results, ctx.out / "results.json")
    print(
        f"[{name}] {'done' if ok else 'FAILED'} in {data['elapsed_s']:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return ok


def _save(results: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
