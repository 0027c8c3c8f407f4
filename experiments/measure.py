"""What every benchmark run reports, and how it is measured.

:class:`RunResult` is one system on one request set: generated tokens (only those the
requests asked for), wall-clock seconds from the first batch to the last answer, peak
memory and failures. Timings synchronise the device first, so queued GPU work is
counted where it ran.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunResult:
    """One system on one set of requests.

    ``failed`` counts requests answered with an error or never answered (lost).
    ``oom_events`` counts out-of-memory errors seen; ``recoveries`` those survived
    by splitting the batch. ``crashed`` is True when an unguarded run hit an OOM.
    """

    system: str
    requests: int
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    oom_events: int = 0
    recoveries: int = 0
    crashed: bool = False
    batch_size: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_s"] = round(self.tokens_per_s, 3)
        data["seconds"] = round(self.seconds, 4)
        return data


def is_cuda(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    """The allocator's peak since the last reset (None off CUDA)."""
    return int(torch.cuda.max_memory_allocated()) if is_cuda(device) else None


@contextmanager
def timed(device: str) -> Iterator[list[float]]:
    """``with timed(dev) as t:`` ... then ``t[0]`` holds the seconds, device work included."""
    box = [0.0]
    sync(device)
    start = time.perf_counter()
    try:
        yield box
    finally:
        sync(device)
        box[0] = time.perf_counter() - start


def rate_between(timeline: Sequence[Sequence[float]], start: float, end: float) -> float:
    """Tokens/s in ``[start, end]`` from ``[t_start, t_end, tokens]`` rows.

    A batch's tokens are spread evenly over its duration (they are generated step by
    step), so a batch that straddles a boundary counts on both sides in proportion.
    """
    if end <= start:
        return 0.0
    tokens = 0.0
    for t_start, t_end, count in timeline:
        overlap = min(end, t_end) - max(start, t_start)
        if overlap > 0:
            tokens += count * overlap / max(t_end - t_start, 1e-9)
    return tokens / (end - start)


def environment(device: str) -> dict[str, Any]:
    """Card, versions, date and git commit: what makes figures comparable."""
    import transformers

    commit = _git("rev-parse", "HEAD")
    card = torch.cuda.get_device_name(0) if is_cuda(device) else platform.processor() or "cpu"
    total = torch.cuda.get_device_properties(0).total_memory if is_cuda(device) else None
    return {
        "card": card,
        "device": device,
        "gpu_memory_bytes": total,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        # None when the copy has no git history (pass --git-commit then).
        "git_dirty": bool(_git("status", "--porcelain", "-uno")) if commit else None,
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()
