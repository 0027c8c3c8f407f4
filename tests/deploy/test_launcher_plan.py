"""How ``aegis run --workers`` numbers its workers (no process started)."""

from __future__ import annotations

import argparse
import socket

import pytest

from services.launcher import (
    LauncherSettings,
    _without_password,
    plan_children,
    worker_count,
    worker_envs,
)

HOST = socket.gethostname()


def test_one_worker_keeps_the_workers_own_defaults() -> None:
    assert worker_envs(1, LauncherSettings()) == [{}]


def test_n_workers_share_the_device_with_their_own_ids_and_ports(monkeypatch) -> None:
    monkeypatch.setenv("AEGIS_DEVICE", "cpu")
    monkeypatch.delenv("AEGIS_WORKER_ID", raising=False)
    monkeypatch.delenv("AEGIS_WORKER_METRICS_PORT", raising=False)
    envs = worker_envs(3, LauncherSettings())
    assert [e["AEGIS_WORKER_ID"] for e in envs] == [f"{HOST}-cpu-{i}" for i in range(3)]
    assert [e["AEGIS_WORKER_METRICS_PORT"] for e in envs] == ["9400", "9401", "9402"]
    assert {e["AEGIS_DEVICE"] for e in envs} == {"cpu"}


def test_one_worker_per_visible_gpu(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("AEGIS_WORKER_METRICS_PORT", "9500")
    monkeypatch.delenv("AEGIS_WORKER_ID", raising=False)
    envs = worker_envs("gpus", LauncherSettings())
    assert [e["AEGIS_DEVICE"] for e in envs] == ["cuda:0", "cuda:1"]  # numbered as CUDA sees them
    assert [e["AEGIS_WORKER_ID"] for e in envs] == [f"{HOST}-cuda0", f"{HOST}-cuda1"]
    assert [e["AEGIS_WORKER_METRICS_PORT"] for e in envs] == ["9500", "9501"]


def test_a_given_id_is_numbered_and_metrics_off_stays_off(monkeypatch) -> None:
    monkeypatch.setenv("AEGIS_WORKER_ID", "edge")
    monkeypatch.setenv("AEGIS_WORKER_METRICS_PORT", "0")
    envs = worker_envs(2, LauncherSettings())
    assert [(e["AEGIS_WORKER_ID"], e["AEGIS_WORKER_METRICS_PORT"]) for e in envs] == [
        ("edge-0", "0"),
        ("edge-1", "0"),
    ]


def test_the_worker_service_expands_to_one_child_per_worker(monkeypatch) -> None:
    monkeypatch.setenv("AEGIS_DEVICE", "cpu")
    children = plan_children(["gateway", "worker", "agent"], 2, LauncherSettings())
    assert [c.name for c in children] == ["gateway", "worker-0", "worker-1", "agent"]


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_worker_counts_are_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        worker_count(bad)


def test_a_redis_password_never_reaches_the_log() -> None:
    assert _without_password("redis://:s3cret@redis:6379/0") == "redis://***@redis:6379/0"
    assert _without_password("redis://user:s3cret@h/1") == "redis://***@h/1"
    assert _without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
