"""The benchmarks' load client: completions posted at once from several processes.

One Python process cannot post hundreds of completions at once without being the
bottleneck itself: on an H200 host a single asyncio client took 0.15 s before the
gateway had queued the first of 512 requests, and 0.36 s more to send the rest, while
its CPU was busy opening connections and parsing answers. Real load comes from many
clients, so :func:`post_all` spreads the requests over ``processes`` client processes
(``python -m experiments.client``). Each opens its keep-alive connections first (an
OpenAI client keeps its pool open), says it is ready, and waits; the clock starts when
all are told to go. Each answer is reported as one JSON line the moment it arrives, so a
monitor (e.g. one that kills a worker after N answers) sees the progress live.

Protocol on the child's stdin/stdout: one JSON line ``{"port", "jobs": [[i, text,
budget], ...]}`` in; ``ready`` out; ``go`` in; then one ``{"i", "answer"}`` line per
answer (``answer`` null for a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.loadtest import Connection

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 900.0
RETRY_STATUS = (429, 503)
RETRY_DELAY_S = 0.1
READY_TIMEOUT_S = 120.0


@dataclass
class Answer:
    """One completion as the client saw it: which request it was and which worker
    answered (the response's ``aegis`` field), and when it arrived (perf_counter, the
    same clock in every process of the host)."""

    tokens: int
    finish_reason: str
    retries: int
    request_id: str = ""
    worker_id: str = ""
    at: float = 0.0


@dataclass
class Progress:
    """How far a load has got; a monitor running beside it reads this."""

    total: int
    start: float
    done: int = 0  # answered or failed
    answered: int = 0
    moved: asyncio.Event = field(default_factory=asyncio.Event)  # set at every answer

    async def next_answer(self, timeout_s: float) -> None:
        """Wait until another answer is in (or ``timeout_s`` passed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.moved.wait(), timeout_s)
        self.moved.clear()


Monitor = Callable[[Progress], Coroutine[Any, Any, object]]


@dataclass
class Load:
    """What :func:`post_all` saw: every answer (None: failed) and when it began."""

    answers: list[Answer | None]
    start: float  # perf_counter when the clients were told to go
    started_at: float  # the same instant, wall clock (as the services record times)
    end: float  # perf_counter when the last answer arrived


async def post_all(
    port: int,
    texts: Sequence[str],
    budgets: Sequence[int],
    processes: int,
    monitor: Monitor | None = None,
) -> Load:
    """Every completion at once from ``processes`` client processes (round-robin)."""
    jobs = [[i, t, b] for i, (t, b) in enumerate(zip(texts, budgets, strict=True))]
    shares = [jobs[k::processes] for k in range(max(1, min(processes, len(jobs))))]
    children = [await _spawn(port, share) for share in shares]
    try:
        for child in children:
            await _expect_ready(child)
        started_at, start = time.time(), time.perf_counter()
        progress = Progress(len(jobs), start)
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        watch = asyncio.create_task(monitor(progress)) if monitor is not None else None
        answers: list[Answer | None] = [None] * len(jobs)
        await asyncio.gather(*(_collect(c, answers, progress) for c in children))
        # When the last answer arrived (its client's clock: perf_counter is the host's
        # monotonic clock in every process), not when the clients' pipes closed, which
        # adds their interpreters' shutdown.
        end = max((a.at for a in answers if a is not None), default=time.perf_counter())
        if watch is not None:
            await watch
        return Load(answers, start, started_at, end)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()


async def _spawn(port: int, jobs: list[list[Any]]) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "experiments.client",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        limit=2**24,
    )  # fmt: skip
    assert child.stdin is not None
    child.stdin.write(json.dumps({"port": port, "jobs": jobs}).encode() + b"\n")
    await child.stdin.drain()
    return child


async def _expect_ready(child: asyncio.subprocess.Process) -> None:
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), READY_TIMEOUT_S)
    if line.strip() != b"ready":
        raise RuntimeError(f"a load client did not start: {line[:300]!r}")


async def _collect(
    child: asyncio.subprocess.Process, answers: list[Answer | None], progress: Progress
) -> None:
    assert child.stdout is not None
    async for line in child.stdout:
        data = json.loads(line)
        answer = data["answer"]
        answers[data["i"]] = Answer(**answer) if answer is not None else None
        progress.done += 1
        progress.answered += answer is not None
        progress.moved.set()


# -- the client process ---------------------------------------------------------------------


async def _serve(spec: dict[str, Any]) -> None:
    port, jobs = int(spec["port"]), spec["jobs"]
    connections = [Connection(port) for _ in jobs]
    await asyncio.gather(*(c.connect() for c in connections))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def one(connection: Connection, index: int, text: str, budget: int) -> None:
        answer = await post(connection, text, budget)
        data = dataclasses.asdict(answer) if answer is not None else None
        sys.stdout.write(json.dumps({"i": index, "answer": data}) + "\n")
        sys.stdout.flush()

    await asyncio.gather(*(one(c, *job) for c, job in zip(connections, jobs, strict=True)))


async def post(connection: Connection, text: str, budget: int) -> Answer | None:
    """One completion; a 429/503 (queue full, Redis busy) is retried as a client would."""
    body = {"model": "bench", "prompt": text, "max_tokens": budget, "temperature": 0}
    body["ignore_eos"] = True  # dropped by today's gateway (no such field): see system.py
    payload = json.dumps(body).encode()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    try:
        for retry in itertools.count():
            try:
                status, _, content = await connection.post("/v1/completions", payload)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                log.warning("request failed: %s", exc)
                return None
            if status in RETRY_STATUS and time.monotonic() < deadline:
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if status != 200:
                log.warning("request answered %d: %s", status, content[:200])
                return None
            data = json.loads(content)
            usage, choice = data["usage"], data["choices"][0]
            where = ((data.get("aegis") or {}).get("results") or [{}])[0]
            return Answer(
                int(usage["completion_tokens"]), str(choice["finish_reason"]), retry,
                str(where.get("request_id", "")), str(where.get("worker_id", "")),
                time.perf_counter(),
            )  # fmt: skip
        return None
    finally:
        await connection.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job = _serve(json.loads(sys.stdin.readline()))
    try:  # the loop uvicorn's gateway runs on too, when installed: a client as fast
        import uvloop
    except ImportError:
        asyncio.run(job)
    else:
        uvloop.run(job)


if __name__ == "__main__":
    main()
