"""The noisy neighbour: a separate process that takes and gives back GPU memory on cue.

Run as ``python -m experiments.neighbour --device cuda``; it answers one line per
command read from stdin:

* ``ballast <card_bytes>`` - hold ``total - card_bytes``, so every process on the GPU
  sees a card of ``card_bytes`` (an 80 GB H100 playing a 24 GB card, say);
* ``spike <fraction>`` - allocate ``fraction`` of the memory free right now;
* ``release`` - free the spike (the ballast stays);
* ``quit``.

Each answer is ``ok <bytes held now>``. On CPU it holds host memory instead (a spike
of ``fraction`` x 64 MiB): the benchmark emulates the effect with an injected OOM bound,
and the neighbour keeps the signalling path the same. :class:`Neighbour` is the
benchmark's side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CPU_NOMINAL_BYTES = 64 << 20
MIN_BLOCK = 64 << 20


class NeighbourError(RuntimeError):
    """The neighbour process died or answered something unexpected."""


class Neighbour:
    """Starts the neighbour process and talks to it (one command at a time)."""

    def __init__(self, device: str, start_timeout_s: float = 120.0) -> None:
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "experiments.neighbour", "--device", self.device],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.held = 0
        self._pending = False
        self._expect("ready")

    def ballast(self, card_bytes: int) -> int:
        return self.call(f"ballast {int(card_bytes)}")

    def spike(self, fraction: float, wait: bool = True) -> int:
        """Allocate; with ``wait=False`` return at once (collect with :meth:`collect`)."""
        self._send(f"spike {fraction}")
        if not wait:
            self._pending = True
            return self.held
        return self._read_ok()

    def release(self) -> int:
        return self.call("release")

    def collect(self) -> int:
        """The answer of a command sent with ``wait=False`` (no-op when none is pending)."""
        if self._pending:
            self._pending = False
            return self._read_ok()
        return self.held

    def call(self, command: str) -> int:
        self.collect()
        self._send(command)
        return self._read_ok()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.collect()
                self._send("quit")
                self.process.wait(30)
            except (OSError, NeighbourError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Neighbour:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, line: str) -> None:
        if self.process.poll() is not None or self.process.stdin is None:
            raise NeighbourError(f"neighbour exited with {self.process.returncode}")
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _expect(self, word: str) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith(word):
            raise NeighbourError(f"neighbour said {line!r}, expected {word!r}")
        return line

    def _read_ok(self) -> int:
        self.held = int(self._expect("ok").split()[1])
        return self.held


# --- the neighbour process -----------------------------------------------------------


class _Holder:
    """Holds blocks of memory on one device."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.ballast: list[Any] = []
        self.spike: list[Any] = []
        if device == "cuda":
            torch.cuda.init()
            torch.empty(1, device="cuda")  # the context now, not during the first spike

    def held(self) -> int:
        return sum(int(b.numel()) for b in self.ballast + self.spike)

    def free_bytes(self) -> tuple[int, int]:
        if self.device == "cuda":
            free, total = self.torch.cuda.mem_get_info()
            return int(free), int(total)
        return CPU_NOMINAL_BYTES, CPU_NOMINAL_BYTES

    def take(self, nbytes: int, into: list[Any]) -> None:
        """Allocate about ``nbytes`` in blocks; stop quietly when the device is full."""
        block = max(MIN_BLOCK, nbytes // 8)
        left = nbytes
        while left >= MIN_BLOCK // 4:
            size = min(block, left)
            try:
                into.append(self.torch.ones(size, dtype=self.torch.uint8, device=self.device))
                left -= size
            except RuntimeError:  # OutOfMemoryError included: take what is there
                if block <= MIN_BLOCK // 4:
                    break
                block //= 2
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def handle(self, words: list[str]) -> bool:
        command = words[0] if words else ""
        if command == "ballast" and self.device == "cuda":
            free, total = self.free_bytes()
            self.take(max(0, total - int(words[1])), self.ballast)
        elif command == "spike":
            free, _ = self.free_bytes()
            self.take(int(float(words[1]) * free), self.spike)
        elif command == "release":
            self.spike.clear()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        elif command == "quit":
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args(argv)
    holder = _Holder(args.device)
    print("ready", flush=True)
    for line in sys.stdin:
        if not holder.handle(line.split()):
            break
        print(f"ok {holder.held()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
