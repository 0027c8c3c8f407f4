"""The headline figures of a benchmark run: one row per comparison, for stdout and markdown.

Every function takes the results dict the benchmark writes (``meta``, ``config``,
``scenarios``); a scenario that did not run (or failed, ``{"error": ...}``) is skipped.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, float | None, str, float | None, float | None]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def scenario_data(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A scenario's data, or None when it did not run, failed or was skipped."""
    data = results.get("scenarios", {}).get(name)
    ran = isinstance(data, dict) and "error" not in data and "skipped" not in data
    return data if ran else None


def summary_rows(results: dict[str, Any]) -> list[Row]:
    """(scenario, measure, AEGIS, peer, peer value, AEGIS/peer) per headline figure."""
    rows: list[Row] = []
    builders = {
        "sweep": _sweep_summary,
        "bursty": _bursty_summary,
        "memory": _memory_summary,
        "adaptive": _adaptive_summary,
        "oom": _oom_summary,
        "system": _system_summary,
        "scaleout": _scaleout_summary,
        "colocated": _colocated_summary,
        "elastic": _elastic_summary,
        "goodput": _goodput_summary,
    }
    for name, build in builders.items():
        data = scenario_data(results, name)
        if data is not None:
            rows += build(data)
    return rows


def _goodput_summary(data: dict[str, Any]) -> list[Row]:
    """TTFT p95 and tokens/s with the target vs without it."""
    target, free = data.get("target"), data.get("no_target")
    if not isinstance(target, dict) or not isinstance(free, dict):
        return []
    ms = data["config"]["ttft_target_ms"]
    return [
        ("goodput", f"TTFT p95 s, target {ms} ms", target["ttft_p95_s"], "no target",
         free["ttft_p95_s"], None),
        ("goodput", "tokens/s with the target", target["tokens_per_s"], "no target",
         free["tokens_per_s"], data["ratio_tokens_per_s"]),
    ]  # fmt: skip


def _elastic_summary(data: dict[str, Any]) -> list[Row]:
    """The neighbour's waits next to AEGIS's pool: the longest wait for its memory with
    AEGIS elastic vs with the same pool static (agent off)."""
    rows: list[Row] = []
    aegis, static = data.get("aegis"), data.get("aegis_agent_off")
    if not isinstance(aegis, dict) or not isinstance(static, dict):
        return rows
    rows.append(("elastic", "requests lost, neighbour 60 % then 90 %", aegis["failed"],
                 "same pool, agent off", static["failed"], None))  # fmt: skip
    got = sum(g["outcome"] != "gave_up" for g in aegis["neighbour"])
    got_static = sum(g["outcome"] != "gave_up" for g in static["neighbour"])
    rows.append(("elastic", "neighbour allocations that succeeded", got,
                 "same pool, agent off", got_static, None))  # fmt: skip
    return rows


def _sweep_summary(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    eager = [p for p in data["points"] if "hf_eager" in p]
    if eager:
        best = max(eager, key=lambda p: p["aegis"]["tokens_per_s"])
        rows.append(
            (
                "sweep",
                f"tokens/s, batch {best['batch_size']}",
                best["aegis"]["tokens_per_s"],
                "HF generate eager",
                best["hf_eager"]["tokens_per_s"],
                best["ratio_vs_eager"],
            )
        )
    for item in data.get("static_cache", []):
        if "error" in item:
            continue
        rows.append(
            (
                "sweep",
                f"tokens/s, batch {item['batch_size']}",
                item["aegis"]["tokens_per_s"],
                item["peer"]["system"],
                item["peer"]["tokens_per_s"],
                item["ratio"],
            )
        )
    cb = data.get("continuous_batching")
    if cb and "error" not in cb:
        rows.append(
            (
                "sweep",
                f"tokens/s, all {cb['requests']} requests",
                cb["aegis"]["tokens_per_s"],
                "HF continuous batching",
                cb["peer"]["tokens_per_s"],
                cb["ratio"],
            )
        )
    return rows


def _bursty_summary(data: dict[str, Any]) -> list[Row]:
    aegis, peer = data["aegis"], data.get("hf_static")
    peer_ok = isinstance(peer, dict) and "error" not in peer
    rows: list[Row] = []
    measures = [
        ("tokens_per_s", "tokens/s"),
        ("ttft_p50_s", "TTFT p50 s"),
        ("e2e_p99_s", "end-to-end p99 s"),
        ("drain_s", "answers after last arrival s"),
    ]
    for key, label in measures:
        theirs = peer.get(key) if peer_ok and peer else None
        rows.append(("bursty", label, aegis.get(key), "batch-at-a-time HF eager", theirs,
                     _ratio(aegis.get(key) or 0.0, theirs or 0.0)))  # fmt: skip
    return rows


def _memory_summary(data: dict[str, Any]) -> list[Row]:
    err = data["prediction_error"]

    def pct(value: float | None) -> float | None:
        return None if value is None else round(100 * value, 2)

    return [
        (
            "memory",
            "mean |error| of fitted peak, %",
            pct(err["fit_mean_abs_rel"]),
            "prior only, %",
            pct(err["prior_mean_abs_rel"]),
            None,
        )
    ]


def _adaptive_summary(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for p in data["phases"]:
        a = p["adaptive"]["tokens_per_s"]
        rows.append(
            (
                "adaptive",
                f"{p['phase']} tokens/s",
                a,
                f"oracle (batch {p['oracle_batch']})",
                p["oracle"]["tokens_per_s"],
                p["ratio_vs_oracle"],
            )
        )
        rows.append(
            (
                "adaptive",
                f"{p['phase']} tokens/s",
                a,
                "default static",
                p["default"]["tokens_per_s"],
                p["ratio_vs_default"],
            )
        )
    return rows


def _oom_summary(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name in ("W3", "W4"):
        w = data.get(name)
        if not w:
            continue
        a, s = w["aegis"], w["static"]
        rows.append(
            (
                f"oom {name}",
                "failed/lost requests",
                a["failed"],
                "static, no guard",
                s["failed"],
                None,
            )
        )
        rows.append(
            (
                f"oom {name}",
                "OOM events",
                a["oom_events"],
                "static, no guard",
                s["oom_events"],
                None,
            )
        )
        rows.append(
            (
                f"oom {name}",
                "tokens/s",
                a["tokens_per_s"],
                "static, no guard",
                s["tokens_per_s"],
                _ratio(a["tokens_per_s"], s["tokens_per_s"]),
            )
        )
    return rows


def _system_summary(data: dict[str, Any]) -> list[Row]:
    s, e = data["system"], data["engine"]
    return [
        (
            "system",
            "tokens/s end to end",
            s["tokens_per_s"],
            "engine alone",
            e["tokens_per_s"],
            data["ratio_system_vs_engine"],
        )
    ]


def _scaleout_summary(data: dict[str, Any]) -> list[Row]:
    one, two, killed = data["one_worker"], data["two_workers"], data["one_killed"]
    return [
        ("scaleout", f"tokens/s, {two['configuration']}", two["tokens_per_s"],
         one["configuration"], one["tokens_per_s"], data["ratio_two_vs_one"]),
        ("scaleout", f"tokens/s, {killed['configuration']}", killed["tokens_per_s"],
         two["configuration"], two["tokens_per_s"], data["ratio_killed_vs_two"]),
    ]  # fmt: skip


def _colocated_summary(data: dict[str, Any]) -> list[Row]:
    alone, together = data["alone"], data["together"]
    rows: list[Row] = [
        ("colocated", f"tokens/s, {together['configuration']}", together["tokens_per_s"],
         alone["configuration"], alone["tokens_per_s"], data["ratio_together_vs_alone"]),
    ]  # fmt: skip
    split = data.get("agent_split")
    if split and split["rounds"]:
        last = split["rounds"][-1]
        rows.append(("colocated", f"tokens/s, {split['label']} (last round)",
                     last["tokens_per_s"], alone["configuration"], alone["tokens_per_s"],
                     last["ratio_vs_alone"]))  # fmt: skip
    return rows


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summary_text(results: dict[str, Any]) -> str:
    """A fixed-width table for stdout."""
    head = ("scenario", "measure", "AEGIS", "peer", "peer value", "AEGIS/peer")
    cells = [head] + [
        (r[0], r[1], fmt(r[2]), r[3], fmt(r[4]), fmt(r[5], 2)) for r in summary_rows(results)
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
