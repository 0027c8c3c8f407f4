"""The Dockerfile (linted by hadolint), its build context, and the slim image's promise:
the services it runs never import torch or transformers."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.compose import ROOT

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # installed by the dev extra
# What the slim image runs: every service but the worker (see docker-compose.yml).
SLIM_MODULES = [
    "services.gateway.__main__",
    "services.gateway.jobs",  # what the jobs worker (rq) executes
    "services.agent.__main__",
    "services.monitor.__main__",
    "services.dashboard.__main__",
    "services.dashboard.app",
    "aegis_cli",
    "services.launcher",
]


def _stages() -> dict[str, str]:
    """Dockerfile text per stage name."""
    parts = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].split(" AS ")[-1].strip(): part for part in parts}


def test_hadolint_passes() -> None:
    done = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_base_image_is_pinned_by_digest() -> None:
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert re.fullmatch(r"python:3\.12-slim@sha256:[0-9a-f]{64}", base)


@pytest.mark.parametrize("stage", ["slim", "worker"])
def test_each_image_runs_as_a_numeric_non_root_user_with_a_health_check(stage: str) -> None:
    text = _stages()[stage]
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"aegis\", \"health\", ", text, re.MULTILINE)


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements pull in, through the installed metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        wanted = [Requirement(r) for r in metadata.requires(req.name) or []]
        todo += [r for r in wanted if not r.marker or r.marker.evaluate({"extra": ""})]
        for extra in req.extras:
            todo += [r for r in wanted if r.marker and r.marker.evaluate({"extra": extra})]
    return seen


def test_only_the_worker_image_installs_torch() -> None:
    stages = _stages()
    assert "torch" not in stages["slim"]
    assert 'pip install --no-cache-dir ".[worker]"' in stages["worker"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    slim = _closure(project["dependencies"])
    assert {"fastapi", "streamlit", "tokenizers"} <= slim  # the closure is really walked
    assert not slim & {"torch", "transformers", "triton"}, "the slim image would get torch"
    assert {"torch", "transformers"} <= _closure(project["optional-dependencies"]["worker"])


def test_the_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "**"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE):
        copied |= set(sources.split())
    assert copied == allowed


@pytest.mark.parametrize("module", SLIM_MODULES)
def test_slim_services_never_import_torch(module: str) -> None:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
