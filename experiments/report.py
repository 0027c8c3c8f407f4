"""Turning ``results.json`` data into ``results.md`` tables and PNG plots.

Every function takes the results dict the benchmark writes (``meta``, ``config``,
``scenarios``); a scenario that did not run (or failed, ``{"error": ...}``) is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments import plots
from experiments.summary import fmt, summary_rows

MIB = 1 << 20


def mib(value: Any) -> str:
    return fmt(value / MIB, 0) if isinstance(value, int | float) else "-"


def cell(value: Any) -> str:
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("|", "\\|")  # a pipe would end the markdown cell


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; floats get one decimal (pass ratios through :func:`r2`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return [*lines, ""]


def r2(value: Any) -> str:
    """A ratio with two decimals."""
    return fmt(value, 2)


# --- markdown ---------------------------------------------------------------------------


def markdown(results: dict[str, Any], images: list[str]) -> str:
    meta = results["meta"]
    lines = ["# AEGIS benchmark results", ""]
    lines += table(
        [
            "card",
            "device",
            "torch",
            "transformers",
            "date",
            "commit",
            "scale",
            "model",
            "precision",
        ],
        [
            [
                meta.get(k, "-") or "-"
                for k in (
                    "card",
                    "device",
                    "torch",
                    "transformers",
                    "date",
                    "git_commit",
                    "scale",
                    "model",
                    "precision",
                )
            ]
        ],
    )
    lines += ["## Summary", ""]
    lines += table(
        ["scenario", "measure", "AEGIS", "peer", "peer value", "AEGIS/peer"],
        [[*r[:5], r2(r[5])] for r in summary_rows(results)],
    )
    sections = {
        "sweep": _sweep_md,
        "bursty": _bursty_md,
        "memory": _memory_md,
        "adaptive": _adaptive_md,
        "oom": _oom_md,
        "system": _system_md,
        "scaleout": _scaleout_md,
        "colocated": _colocated_md,
        "elastic": _elastic_md,
        "goodput": _goodput_md,
    }
    for name, build in sections.items():
        data = results.get("scenarios", {}).get(name)
        if data is None:
            continue
        lines += [f"## {name}", ""]
        if "error" in data:
            lines += [f"**failed:** `{data['error']}`", ""]
        elif "skipped" in data:
            lines += [f"**skipped:** {data['skipped']}", ""]
        else:
            lines += build(data)
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _bursty_md(d: dict[str, Any]) -> list[str]:
    cfg = d["config"]
    phases = ", ".join(f"{p['rate']}/s for {p['seconds']} s" for p in cfg["phases"])
    low, high = cfg["prompt"]
    lines = [
        f"{d['requests']} requests arriving at {phases}; prompts log-normal (median "
        f"{cfg['prompt_median']}, {low}..{high}), max_tokens {cfg['max_tokens']}; "
        f"last arrival at {d['last_arrival_s']} s.",
        "",
    ]
    systems = [("AEGIS engine core", d["aegis"])]
    if isinstance(d.get("hf_static"), dict) and "error" not in d["hf_static"]:
        systems.append((f"HF eager, batch-at-a-time ({cfg['static_batch']})", d["hf_static"]))
    keys = ["tokens_per_s", "completed", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s",
            "drain_s"]  # fmt: skip
    rows = [[name, *[s.get(k) for k in keys], s.get("note") or "-"] for name, s in systems]
    return lines + table(["system", "tok/s", "answered", "TTFT p50 s", "TTFT p99 s",
                          "e2e p50 s", "e2e p99 s", "drain s", "note"], rows)  # fmt: skip


def _goodput_md(d: dict[str, Any]) -> list[str]:
    cfg = d["config"]
    phases = ", ".join(f"{p['rate']}/s for {p['seconds']} s" for p in cfg["phases"])
    warm = (f", after an untimed pass of the same arrivals ({fmt(d['warm_up_s'])} s)"
            if d.get("warm_up_s") else " (no untimed pass first: the run without a target "
            "came first)")  # fmt: skip
    lines = [f"{d['requests']} requests arriving at {phases}; AEGIS adaptive without a "
             f"time-to-first-token target and with {cfg['ttft_target_ms']} ms{warm}.",
             ""]  # fmt: skip
    keys = ["tokens_per_s", "completed", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s",
            "e2e_p50_s", "e2e_p99_s"]  # fmt: skip
    runs = [("no target", d["no_target"]), (f"target {cfg['ttft_target_ms']} ms", d["target"])]
    lines += table(["run", "tok/s", "answered", "TTFT p50 s", "TTFT p95 s", "TTFT p99 s",
                    "e2e p50 s", "e2e p99 s"],
                   [[name, *[r.get(k) for k in keys]] for name, r in runs])  # fmt: skip
    decisions = d["target"]["decisions"]
    if decisions:
        lines += ["", "Decisions with the target:", ""]
        lines += table(["t (s)", "decision"], [[x["t"], x["summary"]] for x in decisions])
    return lines


ELASTIC_SYSTEMS = (
    ("aegis", "AEGIS, agent on (elastic pool)"),
    ("aegis_agent_off", "AEGIS, agent off (static pool)"),
    ("hf_static", "HF eager, batch-at-a-time"),
)


def _elastic_md(d: dict[str, Any]) -> list[str]:
    cfg, card = d["config"], d["card"]
    phases = ", ".join(f"{int(100 * p['fraction'])} % at {p['at_s']} s" for p in cfg["phases"])
    kind = "a virtual card (CPU)" if card["virtual"] else "the card"
    lines = [
        f"{d['requests']} requests at {cfg['rate']}/s for {cfg['seconds']} s. A neighbour "
        f"process takes {phases} of the contested memory ({card['contested'] / 2**30:.1f} "
        f"GiB of {kind}'s {card['total_bytes'] / 2**30:.1f} GiB: free + AEGIS's starting "
        f"pool of {card['start_pool_bytes'] / 2**30:.1f} GiB), {cfg['chunk_bytes'] / 2**30:.2f}"
        f" GiB at a time, retrying for {cfg['neighbour_deadline_s']} s when the card is full.",
        "",
    ]
    systems = [(label, d[key]) for key, label in ELASTIC_SYSTEMS
               if isinstance(d.get(key), dict) and "error" not in d[key]]  # fmt: skip
    segments = ["before"] + [f"phase_{i + 1}" for i in range(len(cfg["phases"]))]
    rows = [[label, s["completed"], s["failed"], s.get("oom_events", 0),
             *[s.get(f"tokens_per_s_{k}") for k in segments], s.get("max_resize_pause_s", "-")]
            for label, s in systems]  # fmt: skip
    lines += table(["system", "answered", "failed/lost", "OOM", "tok/s before",
                    *[f"tok/s {p['fraction']:.0%}" for p in cfg["phases"]], "longest resize s"],
                   rows)  # fmt: skip
    lines += ["", "The neighbour's growths (wait: from its first allocation to holding its "
              "target, or giving up):", ""]  # fmt: skip
    rows = [[label, f"{g['target_gib']} GiB", g["outcome"], g["held_gib"], g["wait_s"],
             g["refused_allocations"]] for label, s in systems for g in s["neighbour"]]  # fmt: skip
    return lines + table(["system", "target", "outcome", "held GiB", "wait s",
                          "refused allocations"], rows)  # fmt: skip


def _sweep_md(d: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["batch_size"],
            p["aegis"]["tokens_per_s"],
            p.get("hf_eager", {}).get("tokens_per_s"),
            r2(p.get("ratio_vs_eager")),
            mib(p["aegis"]["peak_memory_bytes"]),
            mib(p.get("hf_eager", {}).get("peak_memory_bytes")),
        ]
        for p in d["points"]
    ]
    out = table(
        [
            "batch",
            "AEGIS tok/s",
            "HF eager tok/s",
            "AEGIS/eager",
            "AEGIS peak MiB",
            "eager peak MiB",
        ],
        rows,
    )
    extra = [
        [
            i["peer"]["system"],
            i["batch_size"],
            i["aegis"]["tokens_per_s"],
            i["peer"]["tokens_per_s"],
            r2(i["ratio"]),
            i["peer"]["note"] or "-",
        ]
        for i in d.get("static_cache", [])
        if "error" not in i
    ]
    cb = d.get("continuous_batching")
    if cb and "error" not in cb:
        extra.append(
            [
                "HF continuous batching",
                f"AEGIS at {cb['aegis_batch_size']}",
                cb["aegis"]["tokens_per_s"],
                cb["peer"]["tokens_per_s"],
                r2(cb["ratio"]),
                cb["peer"]["extra"].get("attn_implementation", "-"),
            ]
        )
    if extra:
        out += table(["peer", "batch", "AEGIS tok/s", "peer tok/s", "AEGIS/peer", "note"], extra)
    failures = [
        i for i in [*d.get("static_cache", []), d.get("continuous_batching") or {}] if "error" in i
    ]
    return out + [f"**peer failed:** `{i['error']}`" for i in failures] + ([""] if failures else [])


def _memory_md(d: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["series"],
            p["batch_size"],
            p["prompt_len"],
            p["new_tokens"],
            mib(p["peak_bytes"]),
            mib(p["prior_bytes"]),
            mib(p["fitted_bytes"]),
            fmt(100 * abs(p["fitted_bytes"] - p["peak_bytes"]) / p["peak_bytes"]),
        ]
        for p in d["points"]
    ]
    e = d["prediction_error"]
    intro = [
        f"Measured: `{d['memory_source']}`. Mean |error|: fit {fmt(e['fit_mean_abs_rel'], 3)}, "
        f"prior {fmt(e['prior_mean_abs_rel'], 3)}, held-out (generated series, fitted on the "
        f"prompt series) {fmt(e['held_out_generated_mean_abs_rel'], 3)}.",
        "",
    ]
    return intro + table(
        [
            "series",
            "batch",
            "prompt",
            "new",
            "measured MiB",
            "prior MiB",
            "fitted MiB",
            "fit err %",
        ],
        rows,
    )


def _adaptive_md(d: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["phase"],
            p["requests"],
            p["adaptive"]["tokens_per_s"],
            p["oracle"]["tokens_per_s"],
            p["oracle_batch"],
            p["default"]["tokens_per_s"],
            r2(p["ratio_vs_oracle"]),
            r2(p["ratio_vs_default"]),
            p["adaptive"]["failed"],
            ", ".join(map(str, p["adaptive"]["batch_sizes_used"])),
        ]
        for p in d["phases"]
    ]
    o = d["overall"]
    rows.append(
        [
            "overall",
            "-",
            o["adaptive_tokens_per_s"],
            o["oracle_tokens_per_s"],
            "-",
            o["default_tokens_per_s"],
            r2(o["ratio_vs_oracle"]),
            r2(o["ratio_vs_default"]),
            o["lost_requests"],
            "-",
        ]
    )
    out = table(
        [
            "phase",
            "requests",
            "adaptive tok/s",
            "oracle tok/s",
            "oracle batch",
            "default tok/s",
            "adaptive/oracle",
            "adaptive/default",
            "lost",
            "adaptive batches",
        ],
        rows,
    )
    decisions = [[fmt(x["t"], 2), x.get("phase", "-"), x["summary"]] for x in d["decisions"][:30]]
    return [
        *out,
        "Decisions of the adaptive run:",
        "",
        *table(["t (s)", "phase", "decision"], decisions),
    ]


def _oom_md(d: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name in ("W3", "W4"):
        w = d.get(name)
        if not w:
            continue
        rows = [
            [
                w[k]["system"],
                w[k]["requests"],
                w[k]["completed"],
                w[k]["failed"],
                w[k]["oom_events"],
                w[k]["recoveries"],
                w[k]["crashed"],
                w[k]["tokens_per_s"],
                w[k].get("tokens_per_s_before"),
                w[k].get("tokens_per_s_during"),
                w[k].get("tokens_per_s_after"),
            ]
            for k in ("aegis", "static")
        ]
        out += [f"### {name}", ""]
        out += table(
            [
                "system",
                "requests",
                "completed",
                "failed/lost",
                "OOM events",
                "recoveries",
                "crashed",
                "tok/s",
                "before",
                "during",
                "after",
            ],
            rows,
        )
    return out


def _system_md(d: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["system"],
            r["requests"],
            r["completed"],
            r["failed"],
            r["tokens"],
            r["seconds"],
            r["tokens_per_s"],
        ]
        for r in (d["system"], d["engine"])
    ]
    extra = d["system"]["extra"]
    note = extra.get("stopped_before_max_tokens", 0)
    header = ["path", "requests", "completed", "failed", "tokens", "seconds", "tok/s"]
    return [
        *table(header, rows),
        f"System/engine: {fmt(d['ratio_system_vs_engine'], 3)}; "
        f"completions that stopped before max_tokens: {note}; "
        f"client retries after 429/503: {extra.get('retried_429_503', 0)}.",
        "",
        *_runs_md(d),
        *_timeline_md(extra.get("timeline")),
        *_gateways_md(d),
    ]


def _runs_md(d: dict[str, Any]) -> list[str]:
    """Each repeat's tokens/s when the scenario ran more than once (the median is shown)."""
    runs = {key: d[key]["extra"].get("runs_tokens_per_s") or [] for key in ("system", "engine")}
    if len(runs["system"]) < 2:
        return []
    listed = "; ".join(f"{key}: {', '.join(fmt(v) for v in vs)}" for key, vs in runs.items())
    return [f"Median of {len(runs['system'])} runs each (tok/s of every run: {listed}).", ""]


def _gateways_md(d: dict[str, Any]) -> list[str]:
    """The same load with other gateway process counts (median tok/s, ratio to the engine)."""
    points = d.get("more_gateway_processes") or []
    if not points:
        return []
    first = f"{d.get('gateway_processes', '?')} processes {fmt(d['system']['tokens_per_s'])}"
    others = [f"{p['processes']} processes {fmt(p['tokens_per_s'])} tok/s "
              f"({fmt(p['ratio_system_vs_engine'], 3)})" for p in points]  # fmt: skip
    serving = d.get("gateway_serving_on")
    on = f" The gateway said: {serving}." if serving else ""
    return [f"Gateway processes: {first} tok/s; " + "; ".join(others) + "." + on, ""]


def _timeline_md(timeline: dict[str, Any] | None) -> list[str]:
    """Where the system's time went (seconds after the client's first request)."""
    if not timeline or not timeline.get("requests"):
        return []
    t = timeline
    return [
        f"Timeline (s after the first request, from the worker's records): the gateway "
        f"queued the first request at {fmt(t['first_queued_s'], 3)} and the last at "
        f"{fmt(t['last_queued_s'], 3)}; the worker began the first at "
        f"{fmt(t['first_started_s'], 3)} and finished the last at "
        f"{fmt(t['last_finished_s'], 3)} ({fmt(t['server_tokens_per_s'])} tok/s from the "
        f"first queued to the last finished).",
        "",
    ]


def _split(run: dict[str, Any], kv: bool = False) -> str:
    """Per worker: requests and tokens it answered (and its KV pool)."""
    parts = []
    for name, w in run["per_worker"].items():
        part = f"{name}: {w['requests']} req, {fmt(w['tokens'])} tok"
        if kv and w.get("kv_pool_mib") is not None:
            part += f", KV {fmt(w['kv_pool_mib'])} MiB"
        parts.append(part)
    return "; ".join(parts)


def _fleet_table(runs: list[dict[str, Any]], kv: bool = False) -> list[str]:
    """One row per configuration; the ratio is to the first one's tokens/s."""
    base = runs[0]["tokens_per_s"]
    rows = [
        [
            r["configuration"], r["workers"], r["requests"], r["answered_once"], r["failed"],
            r["duplicates"], r["oom_events"], r["tokens"], r["seconds"], r["tokens_per_s"],
            r2(r["tokens_per_s"] / base if base else None), _split(r, kv),
        ]
        for r in runs
    ]  # fmt: skip
    header = ["configuration", "workers", "requests", "answered once", "failed", "duplicates",
              "OOM", "tokens", "seconds", "tok/s", f"vs {runs[0]['configuration']}",
              "per worker"]  # fmt: skip
    return table(header, rows)


def _target(measured: Any, target: Any, met: bool) -> str:
    return f"{r2(measured)} (target {r2(target)}: {'met' if met else 'not met'})"


def _scaleout_md(d: dict[str, Any]) -> list[str]:
    killed = d["one_killed"]
    k = killed["kill"]
    intro = f"{d['requests']} requests ({d['workload']} x {d['copies']}), all at once."
    scale = _target(d["ratio_two_vs_one"], d["target_ratio"], d["meets_target"])
    kill = (
        f"Kill: {k['worker']} SIGKILLed after {k['at_answers']} answers ({k['at_s']} s into "
        f"the run) held {k['held_at_kill']} requests: {k['finished_by_survivor']} finished by "
        f"{k['survivor']} after reclaiming them, {k['answered_by_killed_before_ack']} answered "
        f"by {k['worker']} before it died, {k['unanswered']} unanswered; the last came "
        f"{fmt(k['recovery_s'], 2)} s after the kill. Entries reclaimed: {killed['reclaimed']}; "
        f"runs done twice: {killed['redundant_runs']}. {k['note']}"
    )
    return [
        intro + (f" {d['note']}." if d["note"] else ""),
        "",
        *_fleet_table([d["one_worker"], d["two_workers"], killed]),
        f"2 workers / 1: {scale}.",
        "",
        kill.rstrip(),
        "",
    ]


def _colocated_md(d: dict[str, Any]) -> list[str]:
    intro = (
        f"{d['alone']['requests']} requests alone, {d['requests']} together ({d['workload']} "
        f"x {d['copies']}), each worker at AEGIS_GPU_MEMORY_FRACTION "
        f"{d['config']['gpu_memory_fraction']} when sharing."
    )
    shared = _target(d["ratio_together_vs_alone"], d["target_ratio"], d["meets_target"])
    exits = d["worker_exits"] or "none"
    return [
        intro + (f" {d['note']}." if d["note"] else ""),
        "",
        *_fleet_table([d["alone"], d["together"]], kv=True),
        f"Together / alone: {shared}; OOM events: {d['oom_events']}; workers that exited: {exits}.",
        "",
        *_agent_split_md(d.get("agent_split")),
    ]


def _agent_split_md(split: dict[str, Any] | None) -> list[str]:
    """(c): the rounds with the agent splitting the GPU, the pools, its KV decisions."""
    if not split:
        return []
    rows = [
        f"| {i + 1} | {r['tokens_per_s']:,.0f} | {r['ratio_vs_alone']} | {r['oom_events']} "
        f"| {r['exactly_once']} |"
        for i, r in enumerate(split["rounds"])
    ]
    pools = "; ".join(
        f"{name}: " + " -> ".join(f"{gib} GiB at {at} s" for at, gib in series)
        for name, series in split["pools_gib"].items()
    )
    decisions = [f"- {d['at_s']} s, {d['worker']}: {d['reason']}" for d in split["kv_decisions"]]
    return [
        f"**{split['label']}**" + (f" ({split['note']})" if split["note"] else "") + ":",
        "",
        "| round | tokens/s | / alone | OOM events | answered once |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"KV pools (from the cycle records): {pools or 'none recorded'}. Smallest / largest "
        f"pool at the end: {split['even']}. Workers that exited: "
        f"{split['worker_exits'] or 'none'}.",
        "",
        f"The agent's KV decisions ({len(decisions)}):" if decisions else "No KV decisions.",
        *decisions,
        "",
    ]


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Plots and ``results.md`` into ``out``; returns the files written."""
    images = plots.write_all(results, out)
    md = out / "results.md"
    md.write_text(markdown(results, [p.name for p in images]))
    return [md, *images]
