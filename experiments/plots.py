"""PNG plots of the benchmark's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per scenario that has data; nothing (and no error) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    makers: dict[str, Callable[[Any, dict[str, Any]], None]] = {
        "sweep": _sweep,
        "bursty": _bursty,
        "memory": _memory,
        "adaptive": _adaptive,
        "oom": _oom,
        "system": _system,
        "scaleout": _scaleout,
        "colocated": _colocated,
        "elastic": _elastic,
        "goodput": _goodput,
    }
    written = []
    for name, make in makers.items():
        data = results.get("scenarios", {}).get(name)
        if not isinstance(data, dict) or "error" in data or "skipped" in data:
            continue
        fig = plt.figure(figsize=(11, 4.5))
        make(fig, data)
        fig.suptitle(
            f"{name} - {results['meta'].get('card', '?')} ({results['meta'].get('scale', '?')})"
        )
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bursty(fig: Any, d: dict[str, Any]) -> None:
    """Each answered request: arrival time vs end-to-end latency, per system."""
    ax = fig.add_subplot(1, 1, 1)
    systems = [("AEGIS engine core", d["aegis"])]
    if isinstance(d.get("hf_static"), dict) and "error" not in d["hf_static"]:
        systems.append(("HF eager batch-at-a-time", d["hf_static"]))
    for name, data in systems:
        points = data.get("timeline", [])
        ax.scatter([a for a, _ in points], [f - a for a, f in points], s=4, label=name)
    ax.set_xlabel("arrival (s since start)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.legend()


def _sweep(fig: Any, d: dict[str, Any]) -> None:
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    batches = [p["batch_size"] for p in d["points"]]
    for key, label in (("aegis", "AEGIS engine"), ("hf_eager", "HF generate eager")):
        tps = [p[key]["tokens_per_s"] for p in d["points"] if key in p]
        if tps:
            left.plot(batches[: len(tps)], tps, marker="o", label=label)
        mem = [p[key]["peak_memory_bytes"] for p in d["points"] if key in p]
        if mem and all(m is not None for m in mem):
            right.plot(batches[: len(mem)], [m / MIB for m in mem], marker="o", label=label)
    for item in (i for i in d.get("static_cache", []) if "error" not in i):
        left.scatter(
            [item["batch_size"]],
            [item["peer"]["tokens_per_s"]],
            marker="s",
            s=60,
            color="C3",
            label=f"{item['peer']['system']} b={item['batch_size']}",
        )
    cb = d.get("continuous_batching")
    if cb and "error" not in cb:
        left.axhline(
            cb["peer"]["tokens_per_s"], linestyle="--", color="gray", label="HF continuous batching"
        )
    left.set(xscale="log", xlabel="batch size", ylabel="generated tokens/s", title="throughput")
    right.set(xscale="log", xlabel="batch size", ylabel="peak MiB", title="peak memory (CUDA)")
    left.legend(fontsize=7)
    if right.lines:
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "no allocator peak on CPU", ha="center", transform=right.transAxes)


def _memory(fig: Any, d: dict[str, Any]) -> None:
    for i, series in enumerate(("prompt", "generated")):
        ax = fig.add_subplot(1, 2, i + 1)
        points = [p for p in d["points"] if p["series"] == series]
        for batch in sorted({p["batch_size"] for p in points}):
            rows = sorted(
                (p for p in points if p["batch_size"] == batch), key=lambda p: p["seq_len"]
            )
            x = [p["seq_len"] for p in rows]
            line = ax.plot(
                x, [p["peak_bytes"] / MIB for p in rows], marker="o", label=f"measured b={batch}"
            )
            color = line[0].get_color()
            ax.plot(
                x,
                [p["fitted_bytes"] / MIB for p in rows],
                linestyle="--",
                color=color,
                label=f"fitted model b={batch}",
            )
            ax.plot(
                x,
                [p["prior_bytes"] / MIB for p in rows],
                linestyle=":",
                color=color,
                alpha=0.6,
                label=f"prior b={batch}",
            )
        ax.set(xlabel="prompt + new tokens", ylabel="peak MiB", title=f"{series} length varied")
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, f"measured: {d['memory_source']}", fontsize=7)


def _adaptive(fig: Any, d: dict[str, Any]) -> None:
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [p["phase"] for p in d["phases"]]
    width = 0.27
    for i, (key, label) in enumerate(
        (("adaptive", "AEGIS adaptive"), ("oracle", "oracle static"), ("default", "default static"))
    ):
        xs = [j + (i - 1) * width for j in range(len(names))]
        left.bar(xs, [p[key]["tokens_per_s"] for p in d["phases"]], width, label=label)
    left.set_xticks(range(len(names)), names)
    left.set(ylabel="generated tokens/s", title="tokens/s per phase")
    left.legend(fontsize=7)
    cycles = d["cycles"]
    right.step([c["t_end"] for c in cycles], [c["batch_setting"] for c in cycles], where="post")
    right.set(xlabel="seconds", ylabel="batch size setting", title="adaptive batch size over time")


def _oom(fig: Any, d: dict[str, Any]) -> None:
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    w3 = d.get("W3")
    if w3:
        labels = ["before", "during", "after"]
        for i, key in enumerate(("aegis", "static")):
            vals = [w3[key][f"tokens_per_s_{s}"] for s in labels]
            left.bar(
                [j + (i - 0.5) * 0.4 for j in range(3)],
                vals,
                0.4,
                label=f"{w3[key]['system']} (lost {w3[key]['failed']})",
            )
        left.set_xticks(range(3), labels)
        left.set(ylabel="tokens/s", title="W3 noisy neighbour")
        left.legend(fontsize=7)
    w4 = d.get("W4")
    if w4:
        keys = ("aegis", "static")
        right.bar(
            [w4[k]["system"] for k in keys], [w4[k]["completed"] for k in keys], color=["C0", "C1"]
        )
        for j, k in enumerate(keys):
            right.text(
                j,
                w4[k]["completed"],
                f"OOM {w4[k]['oom_events']}, lost {w4[k]['failed']}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        right.set(ylabel="requests completed", title=f"W4 OOM pressure ({w4['requests']} requests)")


def _goodput(fig: Any, d: dict[str, Any]) -> None:
    """TTFT quantiles (left) and tokens/s (right), without and with the target."""
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    runs = [("no target", d["no_target"]), ("target", d["target"])]
    quantiles = ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s")
    for i, (name, run) in enumerate(runs):
        left.bar([j + (i - 0.5) * 0.4 for j in range(3)],
                 [run.get(q) or 0.0 for q in quantiles], 0.4, label=name)  # fmt: skip
    left.axhline(d["config"]["ttft_target_ms"] / 1000, color="grey", linestyle="--",
                 label="target")  # fmt: skip
    left.set_xticks(range(3), ["p50", "p95", "p99"])
    left.set(ylabel="time to first token (s)", title="TTFT from arrival")
    left.legend(fontsize=7)
    right.bar([name for name, _ in runs], [run["tokens_per_s"] for _, run in runs],
              color=["C0", "C1"])  # fmt: skip
    right.set(ylabel="generated tokens/s", title="throughput")


def _elastic(fig: Any, d: dict[str, Any]) -> None:
    """One time axis: AEGIS's pool and the neighbour's memory (left axis, GiB) and AEGIS's
    tokens/s per window (right axis); the static run's neighbour beside it."""
    ax = fig.add_subplot(1, 1, 1)
    gib = float(1 << 30)
    aegis = d["aegis"]
    pool = aegis.get("pool", [])
    ax.step([t for t, _ in pool], [b / gib for _, b in pool], where="post", label="AEGIS KV pool")
    neighbours = (("aegis", "neighbour (AEGIS elastic)", "-"),
                  ("aegis_agent_off", "neighbour (AEGIS static pool)", ":"))  # fmt: skip
    for key, label, style in neighbours:
        held = d.get(key, {}).get("neighbour_held", [])
        ax.step([t for t, _ in held], [b / gib for _, b in held], style, where="post", label=label)
    ax.set(xlabel="seconds since the run began", ylabel="GiB")
    rate = ax.twinx()
    rows = aegis.get("timeline", [])
    rate.plot([end for _, end, _ in rows],
              [tok / max(end - start, 1e-9) for start, end, tok in rows],
              color="C3", alpha=0.5, label="AEGIS tokens/s")  # fmt: skip
    rate.set_ylabel("tokens/s")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = rate.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=7, loc="upper right")


def _system(fig: Any, d: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    runs = (d["system"], d["engine"])
    ax.bar(
        ["whole system (HTTP)", "engine alone"],
        [r["tokens_per_s"] for r in runs],
        color=["C0", "C2"],
    )
    ax.set(
        ylabel="generated tokens/s", title=f"W1 end to end (ratio {d['ratio_system_vs_engine']})"
    )


def _fleet(ax: Any, runs: list[dict[str, Any]], title: str) -> None:
    """One bar per configuration, stacked by the tokens/s each worker served."""
    labels = [r["configuration"] for r in runs]
    names = sorted({n for r in runs for n in r["per_worker"]})
    bottom = [0.0] * len(runs)
    for i, name in enumerate(names):
        values = [r["per_worker"].get(name, {}).get("tokens_per_s", 0.0) for r in runs]
        ax.bar(labels, values, bottom=bottom, color=f"C{i}", label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for j, r in enumerate(runs):
        mark = "" if r["exactly_once"] else ", NOT exactly once"
        ax.text(j, bottom[j], f"{r['tokens_per_s']:,.0f} tok/s{mark}", ha="center", va="bottom")
    ax.set(ylabel="generated tokens/s (stacked by worker)", title=title)
    ax.legend(fontsize=7)


def _scaleout(fig: Any, d: dict[str, Any]) -> None:
    runs = [d["one_worker"], d["two_workers"], d["one_killed"]]
    ratio, target = d["ratio_two_vs_one"], d["target_ratio"]
    title = f"{d['requests']} requests; 2 workers / 1 = {ratio} (target {target})"
    _fleet(fig.add_subplot(1, 1, 1), runs, title)


def _colocated(fig: Any, d: dict[str, Any]) -> None:
    runs = [d["alone"], d["together"]]
    title = (
        f"together / alone = {d['ratio_together_vs_alone']} (target {d['target_ratio']}), "
        f"OOM events {d['oom_events']}"
    )
    split = d.get("agent_split")
    _fleet(fig.add_subplot(1, 2 if split else 1, 1), runs, title)
    if split:
        ax = fig.add_subplot(1, 2, 2)
        for name, series in split["pools_gib"].items():
            if series:  # a step per change, held to the last record
                ax.step([p[0] for p in series], [p[1] for p in series], where="post", label=name)
        ax.set_xlabel("seconds after the workers' start")
        ax.set_ylabel("KV pool (GiB)")
        ax.set_title(f"the agent splitting one GPU: smallest / largest pool {split['even']}")
        ax.legend()
