"""The noisy neighbour: a separate process that takes and gives back GPU memory.

Run as ``python -m experiments.neighbour --device cuda``; it answers one line per
command read from stdin:

* ``ballast <card_bytes>`` - hold ``total - card_bytes``, so every process on the GPU
  sees a card of ``card_bytes`` (an 80 GB H100 playing a 24 GB card, say);
* ``spike <fraction>`` - allocate ``fraction`` of the memory free right now;
* ``spike_at <delay_s> <fraction> <hold_s>`` - answer at once; a timer thread of this
  process allocates ``fraction`` of the memory free ``delay_s`` seconds later (whatever
  the benchmark process is doing then, e.g. in the middle of ``generate``) and frees it
  ``hold_s`` seconds after it landed;
* ``release`` - free the spike now and cancel a pending ``spike_at`` (the ballast stays);
* ``grow_to <bytes> <chunk_bytes> <deadline_s>`` - answer at once; a thread of this
  process then holds ``bytes`` in all (beyond the ballast) as a polite tenant would take
  memory: ``chunk_bytes`` at a time, and when the device is full it waits 10 ms and tries
  again, for up to ``deadline_s`` seconds, then gives up keeping what it got. Less than it
  holds frees the difference at once;
* ``quit``.

Each answer is ``ok <bytes held now>``. Whenever a spike lands or is freed the process
also writes ``event spike <t> <spike bytes>`` / ``event release <t> 0``; a ``grow_to``
writes ``event grow_start <t> <bytes held>``, ``event held <t> <bytes>`` after every chunk
taken, then ``event grown <t> <bytes> <retries>``
(reached), ``event gave_up <t> <bytes> <retries>`` (deadline passed) or ``event shrunk <t>
<bytes>``, ``retries`` counting the allocations the full device refused; ``t`` being
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of the machine), so
the benchmark knows when the memory was really taken. On CPU it holds host memory
instead (a spike of ``fraction`` x 64 MiB): the benchmark emulates the effect with an
injected OOM bound switched by those events. :class:`Neighbour` is the benchmark's side.
"""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CPU_NOMINAL_BYTES = 64 << 20
MIN_BLOCK = 64 << 20
ANSWER_TIMEOUT_S = 300.0  # a ballast of ~140 GB is taken block by block


class NeighbourError(RuntimeError):
    """The neighbour process died or answered something unexpected."""


@dataclass(frozen=True)
class NeighbourEvent:
    """A spike landed (``kind="spike"``) or was freed (``"release"``) at monotonic ``t``."""

    kind: str
    t: float
    spike_bytes: int
    retries: int = 0


class Neighbour:
    """Starts the neighbour process and talks to it (one command at a time).

    A reader thread splits the process's output: answers go to the caller, events to
    :attr:`events` and to :attr:`on_event` (called in the reader thread: keep it short).
    """

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
        self.events: list[NeighbourEvent] = []
        self.on_event: Callable[[NeighbourEvent], None] | None = None
        self._answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="neighbour-reader", daemon=True).start()
        self._expect("ready", start_timeout_s)

    def ballast(self, card_bytes: int) -> int:
        return self.call(f"ballast {int(card_bytes)}")

    def spike(self, fraction: float) -> int:
        """Allocate ``fraction`` of the free memory now; bytes held after."""
        return self.call(f"spike {fraction}")

    def spike_at(self, delay_s: float, fraction: float, hold_s: float) -> int:
        """Schedule a spike (returns at once); its times arrive as events."""
        return self.call(f"spike_at {float(delay_s)} {float(fraction)} {float(hold_s)}")

    def release(self) -> int:
        return self.call("release")

    def grow_to(self, nbytes: int, chunk_bytes: int, deadline_s: float) -> int:
        """Start taking (or freeing) memory up to ``nbytes``; returns at once, the
        outcome arrives as events (``grown``, ``gave_up``, ``shrunk``)."""
        return self.call(f"grow_to {int(nbytes)} {int(chunk_bytes)} {float(deadline_s)}")

    def call(self, command: str) -> int:
        self._send(command)
        self.held = int(self._expect("ok").split()[1])
        return self.held

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._send("quit")
                self.process.wait(30)
            except (OSError, NeighbourError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Neighbour:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.strip()
            if line.startswith("event "):
                self._event(line.split())
            else:
                self._answers.put(line)
        self._answers.put(None)  # the process is gone

    def _event(self, words: list[str]) -> None:
        retries = int(words[4]) if len(words) > 4 else 0
        event = NeighbourEvent(words[1], float(words[2]), int(words[3]), retries)
        self.events.append(event)
        callback = self.on_event
        if callback is not None:
            callback(event)

    def _send(self, line: str) -> None:
        if self.process.poll() is not None or self.process.stdin is None:
            raise NeighbourError(f"neighbour exited with {self.process.returncode}")
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _expect(self, word: str, timeout_s: float = ANSWER_TIMEOUT_S) -> str:
        try:
            line = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            raise NeighbourError(f"neighbour silent for {timeout_s} s, expected {word!r}") from None
        if line is None:
            raise NeighbourError(f"neighbour exited with {self.process.poll()}")
        if not line.startswith(word):
            raise NeighbourError(f"neighbour said {line!r}, expected {word!r}")
        return line


# --- the neighbour process -----------------------------------------------------------


def _say(line: str, lock: threading.Lock) -> None:
    with lock:  # answers and timer events must not interleave mid-line
        print(line, flush=True)


class _Holder:
    """Holds blocks of memory on one device; the stdin loop and a timer thread share it."""

    def __init__(self, device: str, out_lock: threading.Lock) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.ballast: list[Any] = []
        self.spike: list[Any] = []
        self.lock = threading.Lock()  # guards ballast/spike/_stop
        self.out_lock = out_lock
        self._stop: threading.Event | None = None  # the pending timed spike's cancel flag
        if device == "cuda":
            torch.cuda.init()
            torch.empty(1, device="cuda")  # the context now, not during the first spike

    def held(self) -> int:
        with self.lock:
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
            _, total = self.free_bytes()
            with self.lock:
                self.take(max(0, total - int(words[1])), self.ballast)
        elif command == "spike":
            with self.lock:
                self._spike(float(words[1]))
        elif command == "spike_at":
            self.schedule(float(words[1]), float(words[2]), float(words[3]))
        elif command == "release":
            with self.lock:
                self._cancel()
                self._release()
        elif command == "grow_to":
            self.start_growth(int(words[1]), int(words[2]), float(words[3]))
        elif command == "quit":
            return False
        return True

    def start_growth(self, target: int, chunk: int, deadline_s: float) -> None:
        """Start the thread of one ``grow_to`` (a pending spike or growth is cancelled)."""
        stop = threading.Event()
        with self.lock:
            self._cancel()
            self._stop = stop
        args = (target, max(MIN_BLOCK // 4, chunk), deadline_s, stop)
        threading.Thread(target=self._grow, args=args, name="grow", daemon=True).start()

    def _grow(self, target: int, chunk: int, deadline_s: float, stop: threading.Event) -> None:
        started = time.monotonic()
        _say(f"event grow_start {started:.6f} {self._spike_bytes()}", self.out_lock)
        if self._spike_bytes() > target:
            with self.lock:
                while self.spike and self._spike_bytes() > target:
                    self.spike.pop()
                self._empty_cache()
            _say(f"event shrunk {time.monotonic():.6f} {self._spike_bytes()}", self.out_lock)
            return
        retries = 0
        while not stop.is_set():
            with self.lock:
                left = target - self._spike_bytes()
                if left < MIN_BLOCK // 4:
                    break
                taken = self._try_take(min(chunk, left))
            if taken:
                _say(f"event held {time.monotonic():.6f} {self._spike_bytes()}", self.out_lock)
                continue
            retries += 1
            if time.monotonic() - started > deadline_s:
                _say(f"event gave_up {time.monotonic():.6f} {self._spike_bytes()} {retries}",
                     self.out_lock)  # fmt: skip
                return
            stop.wait(0.01)  # the device is full: wait for memory to come back
        if not stop.is_set():
            _say(f"event grown {time.monotonic():.6f} {self._spike_bytes()} {retries}",
                 self.out_lock)  # fmt: skip

    def _try_take(self, size: int) -> bool:
        try:
            self.spike.append(self.torch.ones(size, dtype=self.torch.uint8, device=self.device))
        except RuntimeError:  # OutOfMemoryError included
            return False
        if self.device == "cuda":
            self.torch.cuda.synchronize()  # really taken now, not when the fill runs
        return True

    def _spike_bytes(self) -> int:
        return sum(int(b.numel()) for b in self.spike)

    def _empty_cache(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def schedule(self, delay_s: float, fraction: float, hold_s: float) -> None:
        """Start the timer thread of one spike (a pending one is cancelled)."""
        stop = threading.Event()
        with self.lock:
            self._cancel()
            self._stop = stop
        args = (delay_s, fraction, hold_s, stop)
        threading.Thread(target=self._timed, args=args, name="spike", daemon=True).start()

    def _timed(self, delay_s: float, fraction: float, hold_s: float, stop: threading.Event) -> None:
        if stop.wait(max(0.0, delay_s)):
            return
        with self.lock:
            if stop.is_set():  # cancelled while we waited for the lock
                return
            self._spike(fraction)
        if stop.wait(max(0.0, hold_s)):
            return  # ``release`` freed it
        with self.lock:
            if not stop.is_set():
                self._release()

    def _cancel(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def _spike(self, fraction: float) -> None:
        free, _ = self.free_bytes()
        self.take(int(fraction * free), self.spike)
        nbytes = sum(int(b.numel()) for b in self.spike)
        _say(f"event spike {time.monotonic():.6f} {nbytes}", self.out_lock)

    def _release(self) -> None:
        if not self.spike:
            return
        self.spike.clear()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        _say(f"event release {time.monotonic():.6f} 0", self.out_lock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args(argv)
    out_lock = threading.Lock()
    holder = _Holder(args.device, out_lock)
    _say("ready", out_lock)
    for line in sys.stdin:
        try:
            if not holder.handle(line.split()):
                break
        except (IndexError, ValueError) as exc:  # a bad command: say so, keep serving
            _say(f"error {type(exc).__name__}: {exc}", out_lock)
            continue
        _say(f"ok {holder.held()}", out_lock)
    with holder.lock:
        holder._cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
