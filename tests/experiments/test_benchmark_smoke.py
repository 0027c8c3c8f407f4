"""Every benchmark scenario at tiny scale on CPU: well-formed results, tables and plots.

The core scenarios run in-process once (module fixture); the system scenario starts
the gateway and a worker against the test's Redis and runs separately, as do the
scaleout and colocated scenarios (a gateway and two workers).
"""

from __future__ import annotations

import json
import pstats
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import report, workloads
from experiments.benchmark import main
from experiments.summary import summary_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CORE = ("sweep", "bursty", "goodput", "memory", "adaptive", "elastic", "oom")
ARGS = ["--scale", "tiny", "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "0"]


def _asked(name: str) -> int:
    """Tokens the tiny workload asks for (EOS ignored: exactly what must be generated)."""
    load = workloads.workload(name, "tiny")
    return workloads.useful_tokens(workloads.all_requests(load, 0, 512))


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--scenario", ",".join(CORE), "--out", str(out), *ARGS]) == 0
    return out, json.loads((out / "results.json").read_text())


def _valid_png(path: Path) -> None:
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = plt.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_results_json_records_environment_and_config(core: tuple[Path, dict[str, Any]]) -> None:
    _, results = core
    meta = results["meta"]
    for key in (
        "card",
        "torch",
        "transformers",
        "date",
        "git_commit",
        "scale",
        "model",
        "precision",
    ):
        assert key in meta
    assert meta["scale"] == "tiny" and meta["precision"] == "fp32" and meta["synthetic"] is True
    assert set(results["config"]["workloads"]) == {"W1", "W2", "W3", "W4"}
    assert results["config"]["scenarios_run"] == list(CORE)
    for name in CORE:
        assert "error" not in results["scenarios"][name], results["scenarios"][name]


def test_sweep_compares_aegis_with_every_peer(core: tuple[Path, dict[str, Any]]) -> None:
    sweep = core[1]["scenarios"]["sweep"]
    assert [p["batch_size"] for p in sweep["points"]] == [2, 4, 8, 16]
    for point in sweep["points"]:
        for system in ("aegis", "hf_eager"):
            run = point[system]
            assert run["tokens_per_s"] > 0 and run["failed"] == 0
            assert run["completed"] == point["requests"] == point["batch_size"]
        assert point["aegis"]["tokens"] == point["hf_eager"]["tokens"]  # same work, EOS ignored
        assert point["ratio_vs_eager"] > 0
    static = sweep["static_cache"][0]
    assert static["peer"]["tokens_per_s"] > 0 and static["peer"]["extra"]["compiled"] is False
    cb = sweep["continuous_batching"]
    assert cb["peer"]["completed"] == cb["requests"] == 16
    assert cb["peer"]["tokens"] == cb["aegis"]["tokens"] == _asked("W1")
    assert cb["ratio"] > 0


def test_memory_points_and_fit(core: tuple[Path, dict[str, Any]]) -> None:
    memory = core[1]["scenarios"]["memory"]
    assert memory["memory_source"] == "analytic_estimate_cpu"
    prompt = [p for p in memory["points"] if p["series"] == "prompt"]
    assert len(prompt) == 8 and len(memory["points"]) == 11
    for p in memory["points"]:
        assert p["peak_bytes"] > 0 and p["fitted_bytes"] > 0 and p["prior_bytes"] > 0
    # Longer prompts at the same batch need more memory.
    b4 = sorted((p for p in prompt if p["batch_size"] == 4), key=lambda p: p["prompt_len"])
    assert [p["peak_bytes"] for p in b4] == sorted(p["peak_bytes"] for p in b4)
    assert all(v is not None and v >= 0 for v in memory["prediction_error"].values())


def test_adaptive_runs_every_phase_without_loss(core: tuple[Path, dict[str, Any]]) -> None:
    adaptive = core[1]["scenarios"]["adaptive"]
    phases = workloads.generate(workloads.workload("W2", "tiny"), 0, 512)
    assert [p["phase"] for p in adaptive["phases"]] == ["short", "long", "mixed"]
    for row, (phase, requests) in zip(adaptive["phases"], phases, strict=True):
        assert row["phase"] == phase.name
        for key in ("adaptive", "oracle", "default"):
            assert row[key]["failed"] == 0 and row[key]["tokens_per_s"] > 0
            assert row[key]["tokens"] == workloads.useful_tokens(requests)
        # The oracle is the best static candidate, the default one of them.
        assert row["oracle"]["tokens_per_s"] >= row["default"]["tokens_per_s"]
        assert row["oracle"]["tokens_per_s"] == max(c["tokens_per_s"] for c in row["candidates"])
    assert adaptive["overall"]["lost_requests"] == 0
    assert adaptive["cycles"] and all(c["batch_setting"] >= 1 for c in adaptive["cycles"])


def test_oom_aegis_recovers_where_static_fails(core: tuple[Path, dict[str, Any]]) -> None:
    oom = core[1]["scenarios"]["oom"]
    for name in ("W3", "W4"):
        aegis, static = oom[name]["aegis"], oom[name]["static"]
        assert aegis["failed"] == 0 and aegis["completed"] == oom[name]["requests"]
        assert aegis["tokens"] == _asked(name)
        # The core's step budget keeps steps under the injected bound or recovers.
        assert aegis["oom_events"] == aegis["recoveries"]
        assert static["crashed"] is True and static["failed"] > 0 and static["oom_events"] >= 1
    assert oom["W4"]["static"]["failed"] == oom["W4"]["requests"]  # every batch too big


def test_w3_neighbour_spike_is_time_based(core: tuple[Path, dict[str, Any]]) -> None:
    w3 = core[1]["scenarios"]["oom"]["W3"]
    timing = w3["config"]["neighbour"]
    start, hold = timing["start_s"], timing["hold_s"]
    for key in ("aegis", "static"):
        run = w3[key]
        # The neighbour's own timer, not request progress: it lands start_s after the
        # run starts (plus its allocation and signalling latency) and is held hold_s.
        assert run["spike_landed"] is True and run["neighbour_spike_bytes"] > 0
        assert start * 0.9 <= run["t_spike_s"] <= start + 0.3, run
        assert run["t_spike_s"] <= run["t_release_s"] <= run["seconds"]
        held = run["t_release_s"] - run["t_spike_s"]
        if run["t_release_s"] < run["seconds"]:  # freed by its timer, not the run's end
            assert hold * 0.9 <= held <= hold + 0.3, run
        assert run["tokens_per_s_before"] > 0
    # The static server lost requests to the spike; AEGIS lost none (every OOM recovered).
    assert w3["static"]["failed"] > 0 and w3["static"]["crashed"] is True
    assert w3["aegis"]["failed"] == 0 and w3["aegis"]["oom_events"] == w3["aegis"]["recoveries"]


def test_elastic_pool_makes_room_for_the_neighbour_and_takes_it_back(
    core: tuple[Path, dict[str, Any]],
) -> None:
    elastic = core[1]["scenarios"]["elastic"]
    aegis, static = elastic["aegis"], elastic["aegis_agent_off"]
    for run in (aegis, static, elastic["hf_static"]):
        assert run["completed"] == elastic["requests"] > 0 and run["failed"] == 0
        assert [g["outcome"] for g in run["neighbour"]] == ["grown", "grown", "shrunk"]
    # The agent shrank the pool while the neighbour grew and grew it back after it left.
    sizes = [r["blocks_after"] for r in aegis["resizes"]]
    smallest = sizes.index(min(sizes))
    assert 0 < smallest < len(sizes) - 1, sizes
    assert sizes[-1] > sizes[smallest] and sizes[smallest] < sizes[0]
    assert any("kv_budget" in d["summary"] for d in aegis["decisions"])
    pools = [b for _, b in aegis["pool"]]
    assert min(pools) < pools[0] and pools[-1] > min(pools)
    # Agent off: the pool stays as it started (one resize: to the starting size).
    assert len(static["resizes"]) == 1 and static["decisions"] == []
    assert all(b == static["pool"][0][1] for _, b in static["pool"])
    assert aegis["tokens_per_s_before"] > 0 and "tokens_per_s_phase_3" in aegis


def test_goodput_target_moves_the_agent_and_loses_nothing(
    core: tuple[Path, dict[str, Any]],
) -> None:
    goodput = core[1]["scenarios"]["goodput"]
    free, target = goodput["no_target"], goodput["target"]
    for run in (free, target):
        assert run["completed"] == goodput["requests"] > 0 and run["failed"] == 0
        assert run["ttft_p95_s"] is not None and run["ttft_p50_s"] <= run["ttft_p95_s"]
    # A 1 ms target is missed by every window: the agent acts on it, and only with it.
    assert any("TTFT p95" in d["summary"] for d in target["decisions"])
    assert not any("TTFT" in d["summary"] for d in free["decisions"])
    assert goodput["ratio_tokens_per_s"] > 0
    assert goodput["warm_up_s"] > 0  # an untimed pass of the same arrivals came first


def test_bursty_arrivals_are_served_as_they_come(core: tuple[Path, dict[str, Any]]) -> None:
    bursty = core[1]["scenarios"]["bursty"]
    aegis, peer = bursty["aegis"], bursty["hf_static"]
    assert aegis["completed"] == bursty["requests"] > 0 and aegis["failed"] == 0
    assert len(aegis["timeline"]) == bursty["requests"]
    # No request is answered before it arrives, and every latency figure is there.
    assert all(finished >= arrived for arrived, finished in aegis["timeline"])
    for key in ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"):
        assert 0 <= aegis[key] <= aegis["e2e_p99_s"]
    assert peer["completed"] == bursty["requests"] and peer["tokens"] == aegis["tokens"]
    assert bursty["ratio_tokens_per_s"] > 0


def test_markdown_and_plots(core: tuple[Path, dict[str, Any]]) -> None:
    out, _ = core
    md = (out / "results.md").read_text()
    assert "| scenario | measure | AEGIS | peer | peer value | AEGIS/peer |" in md
    for heading in ("## sweep", "## bursty", "## memory", "## adaptive", "## oom", "### W3",
                    "## elastic", "## goodput"):  # fmt: skip
        assert heading in md
    assert "paged\\|sdpa" in md  # pipes inside cells are escaped
    for name in CORE:
        _valid_png(out / f"{name}.png")
        assert f"({name}.png)" in md


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert main(["--scenario", "nope", "--out", str(tmp_path), *ARGS]) == 2
    assert main(["--peers", "vllm", "--out", str(tmp_path), *ARGS]) == 2
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_system_scenario_through_gateway_and_worker(
    aegis_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AEGIS_BENCH_PROFILE_WORKER", "1")
    assert main(["--scenario", "system", "--out", str(tmp_path), *ARGS]) == 0
    system = json.loads((tmp_path / "results.json").read_text())["scenarios"]["system"]
    assert "error" not in system, system
    for key in ("system", "engine"):
        run = system[key]
        assert run["failed"] == 0 and run["completed"] == run["requests"] == 16
        assert run["tokens_per_s"] > 0
    assert system["engine"]["tokens"] == _asked("W1")
    assert system["system"]["tokens"] <= system["engine"]["tokens"]
    assert system["ratio_system_vs_engine"] > 0
    # The timeline covers the timed requests only (not the warm-up) and is ordered.
    assert len(system["system"]["extra"]["runs_tokens_per_s"]) == 2  # the tiny config's repeats
    assert len(system["engine"]["extra"]["runs_tokens_per_s"]) == 2
    timeline = system["system"]["extra"]["timeline"]
    assert timeline["requests"] == 16
    assert 0 <= timeline["first_queued_s"] <= timeline["last_queued_s"]
    assert timeline["first_queued_s"] <= timeline["first_started_s"]
    assert timeline["last_queued_s"] < timeline["last_finished_s"] <= system["system"]["seconds"]
    assert timeline["server_tokens_per_s"] >= system["system"]["tokens_per_s"]
    assert "Timeline (s after the first request" in (tmp_path / "results.md").read_text()
    # The same load through a gateway of another process count (1 in the tiny config).
    [point] = system["more_gateway_processes"]
    assert point["processes"] == 1 and point["failed"] == 0
    assert point["timeline"]["requests"] == 16 and point["ratio_system_vs_engine"] > 0
    assert "Gateway processes: 2 processes" in (tmp_path / "results.md").read_text()
    # What its processes serve on (uvicorn[standard] is installed here).
    assert system["gateway_serving_on"] == "serving on uvloop with httptools"
    # The profiled second pass: its worker's serving loop is in the profile.
    profiled = system["system"]["extra"]["profiled"]
    assert profiled["tokens_per_s"] > 0
    stats = pstats.Stats(profiled["profile"])
    assert any(name == "iterate" for _, _, name in stats.stats)  # type: ignore[attr-defined]
    _valid_png(tmp_path / "system.png")


def _served_once(run: dict[str, Any], requests: int, workers: set[str]) -> None:
    """Every request answered exactly once, each by one of ``workers``, none failed."""
    assert run["requests"] == run["completed"] == run["answered_once"] == requests, run
    assert run["failed"] == run["duplicates"] == run["unattributed"] == 0
    assert run["exactly_once"] is True and run["worker_exits"] == {}
    assert set(run["per_worker"]) == workers
    assert sum(w["requests"] for w in run["per_worker"].values()) == requests
    assert sum(w["tokens"] for w in run["per_worker"].values()) == run["tokens"]
    assert run["tokens"] == requests * 6  # tiny W1: 6 new tokens each, EOS ignored
    assert run["tokens_per_s"] > 0 and run["oom_events"] == 0


@pytest.mark.slow
def test_scaleout_scenario_two_workers_and_one_killed(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    """Two CPU workers behind one gateway; one is SIGKILLed mid-run and the requests it
    held are reclaimed and answered by the other (about 30 s)."""
    assert main(["--scenario", "scaleout", "--out", str(tmp_path), *ARGS]) == 0
    data = json.loads((tmp_path / "results.json").read_text())["scenarios"]["scaleout"]
    assert "error" not in data, data
    n = 2 * workloads.workload("W1", "tiny").phases[0].count
    assert data["requests"] == n and data["gpus"] is None and "CPU" in data["note"]
    _served_once(data["one_worker"], n, {"worker-0"})
    both = {"worker-0", "worker-1"}
    _served_once(data["two_workers"], n, both)
    assert all(w["requests"] > 0 for w in data["two_workers"]["per_worker"].values())
    killed = data["one_killed"]
    _served_once(killed, n, both)
    kill = killed["kill"]
    assert (kill["worker"], kill["survivor"]) == ("worker-1", "worker-0")
    assert kill["at_answers"] >= kill["after_answers"] > 0
    # It died holding requests; each was answered once, by the survivor after reclaiming
    # it (or, published just before the SIGKILL and not yet acknowledged, by itself).
    assert kill["held_at_kill"] > 0 and kill["unanswered"] == 0
    assert kill["finished_by_survivor"] > 0
    assert (
        kill["finished_by_survivor"] + kill["answered_by_killed_before_ack"] == kill["held_at_kill"]
    )
    assert killed["per_worker"]["worker-0"]["reclaimed"] >= kill["finished_by_survivor"]
    assert kill["recovery_s"] > 0
    for key in ("ratio_two_vs_one", "ratio_killed_vs_two"):
        assert data[key] > 0
    assert isinstance(data["meets_target"], bool)
    md = (tmp_path / "results.md").read_text()
    assert "## scaleout" in md and "Kill: worker-1 SIGKILLed" in md
    _valid_png(tmp_path / "scaleout.png")
    assert (tmp_path / "logs" / "scaleout" / "worker-1.log").stat().st_size > 0


@pytest.mark.slow
def test_colocated_scenario_two_workers_on_one_device(
    aegis_env: dict[str, str], tmp_path: Path
) -> None:
    """One worker alone, then two sharing the device (each with its memory share), W1
    each: every request answered once, no OOM (about 25 s)."""
    assert main(["--scenario", "colocated", "--out", str(tmp_path), *ARGS]) == 0
    data = json.loads((tmp_path / "results.json").read_text())["scenarios"]["colocated"]
    assert "error" not in data, data
    n = workloads.workload("W1", "tiny").phases[0].count
    _served_once(data["alone"], n, {"worker-0"})
    together = data["together"]
    _served_once(together, 2 * n, {"worker-1", "worker-2"})
    for worker in together["per_worker"].values():
        assert worker["requests"] > 0
        assert worker["env"]["AEGIS_GPU_MEMORY_FRACTION"] == "0.45"
        assert worker["kv_pool_mib"] > 0
    assert data["oom_events"] == 0 and data["worker_exits"] == {}
    assert data["ratio_together_vs_alone"] > 0 and isinstance(data["meets_target"], bool)
    # (c) the monitor and the agent run beside two workers started with the defaults.
    split = data["agent_split"]
    assert len(split["rounds"]) == data["config"]["agent_rounds"] > 0 and all(
        r["exactly_once"] for r in split["rounds"]
    )
    assert split["oom_events"] == 0 and split["worker_exits"] == {}
    assert set(split["pools_gib"]) == {"worker-0", "worker-1"}
    assert all(series and series[-1][1] > 0 for series in split["pools_gib"].values())
    logs = tmp_path / "logs" / "colocated-agent"
    assert "monitor started" in (logs / "monitor.log").read_text()
    agent_log = (logs / "agent.log").read_text()
    assert all(f"worker-{i} found" in agent_log for i in (0, 1)), agent_log
    md = (tmp_path / "results.md").read_text()
    assert "## colocated" in md and "the agent splitting" in md
    _valid_png(tmp_path / "colocated.png")


def test_scaleout_is_skipped_without_two_gpus(tmp_path: Path) -> None:
    """On a CUDA run with fewer than two GPUs the scenario says so instead of failing."""
    from experiments.context import BenchContext
    from experiments.scenarios import scaleout

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    ctx = BenchContext(scale="tiny", device="cuda", out=tmp_path)
    data = scaleout.run(ctx)
    assert data["skipped"].startswith("needs 2 GPUs, found")
    results = {"meta": {"card": "x", "scale": "tiny"}, "scenarios": {"scaleout": data}}
    assert summary_rows(results) == []
    files = report.write(results, tmp_path)
    assert "**skipped:** needs 2 GPUs" in (tmp_path / "results.md").read_text()
    assert [f.name for f in files] == ["results.md"]  # no plot of a skipped scenario
