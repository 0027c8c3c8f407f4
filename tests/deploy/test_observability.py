"""Prometheus and Grafana of the ``observability`` profile: what they scrape and show
matches the services' metrics and the paths docker-compose.yml mounts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aegis_cli import TARGETS_FILE
from services.gateway.metrics import GatewayMetrics
from services.worker.metrics import WorkerMetrics
from tests.deploy.compose import ROOT, env_file, resolved

DEPLOY = ROOT / "deploy"
# The worker metrics the dashboard shows (vLLM's set, under aegis_worker_).
WORKER_METRICS = {
    "aegis_worker_generation_tokens_total",
    "aegis_worker_prompt_tokens_total",
    "aegis_worker_num_requests_running",
    "aegis_worker_num_requests_waiting",
    "aegis_worker_kv_cache_usage_perc",
    "aegis_worker_num_preemptions_total",
    "aegis_worker_time_to_first_token_seconds",
    "aegis_worker_inter_token_latency_seconds",
    "aegis_worker_e2e_request_latency_seconds",
    "aegis_worker_oom_events_total",
    "aegis_worker_settings_version",
}


def _exposed_names(registry: Any) -> set[str]:
    """Every series name a registry exposes, labelled families included (no sample yet)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/aegis.json").read_text())
    return dashboard


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\baegis_[a-z0-9_]+", expr))


@pytest.fixture
def mounts(tmp_path: Path) -> dict[str, dict[str, str]]:
    """Container path -> host path of the bind mounts, per observability service."""
    services = resolved([ROOT / "docker-compose.yml"], env_file(tmp_path), ("observability",))
    return {
        name: {
            v["target"]: v["source"]
            for v in services["services"][name]["volumes"]
            if v["type"] == "bind"
        }
        for name in ("prometheus", "grafana")
    }


def test_prometheus_scrapes_the_gateway_and_every_worker(mounts) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = [t for c in jobs["aegis-gateway"]["static_configs"] for t in c["targets"]]
    assert gateway == ["gateway:8000"]
    worker = jobs["aegis-worker"]
    assert [t for c in worker["static_configs"] for t in c["targets"]] == ["worker:9400"]
    # The targets `aegis compose` writes land where Prometheus reads them.
    (files,) = [f for sd in worker["file_sd_configs"] for f in sd["files"]]
    host_dir = Path(mounts["prometheus"]["/etc/prometheus"])
    assert host_dir == DEPLOY / "prometheus"
    container_file = Path("/etc/prometheus") / (ROOT / TARGETS_FILE).relative_to(host_dir)
    assert container_file.match(files)


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(mounts) -> None:
    grafana = mounts["grafana"]
    provisioning = Path(grafana["/etc/grafana/provisioning"])
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards/aegis.yml").read_text())["providers"]
    dashboards = Path(grafana[provider["options"]["path"]])
    assert (dashboards / "aegis.json").is_file()
    used = {t["datasource"]["uid"] for p in _dashboard()["panels"] for t in p["targets"]}
    assert used == {source["uid"]}


def test_the_dashboard_shows_every_agreed_worker_metric() -> None:
    shown = set().union(*(_metric_names(e) for e in _exprs()))
    histograms = {m + "_bucket" for m in WORKER_METRICS if m.endswith("_seconds")}
    plain = {m for m in WORKER_METRICS if not m.endswith("_seconds")}
    assert plain | histograms <= shown


def test_the_workers_export_every_agreed_metric() -> None:
    exposed = _exposed_names(WorkerMetrics("w").registry)
    histograms = {m + "_bucket" for m in WORKER_METRICS if m.endswith("_seconds")}
    assert {m for m in WORKER_METRICS if not m.endswith("_seconds")} | histograms <= exposed


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    known = _exposed_names(GatewayMetrics().registry) | _exposed_names(WorkerMetrics("w").registry)
    for expr in _exprs():
        assert _metric_names(expr) <= known, expr


def test_every_panel_has_a_title_a_unit_and_a_unique_place() -> None:
    panels = _dashboard()["panels"]
    places = set()
    for panel in panels:
        assert panel["title"] and panel["fieldConfig"]["defaults"]["unit"]
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in places, f"{panel['title']} overlaps another panel"
                places.add((x, y))
