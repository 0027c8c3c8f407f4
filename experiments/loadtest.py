"""Loopback load test of the gateway: a steady load, a burst, then an overload that must only 429.

``python -m experiments.loadtest --out results/loadtest`` starts, for each phase, a
gateway (one process, or ``--gateway-processes N`` on one port) and a paced echo worker
process on the local Redis (own key prefix), then runs

1. ``steady``: 2,000 completions from 64 concurrent clients, a worker faster than the
   gateway (64 requests per 10 ms step): every one must be a 200;
2. ``burst``: 1,024 completions sent at once (``--burst``), one per client, queue bound
   1,024, a worker that takes all of them in one 10 ms step: the gateway's cost per
   request from admission to answer, as the system benchmark's W1 burst has it;
3. ``overload``: 2,000 completions from 256 concurrent clients against a worker slower
   than the offered load (8 requests per 200 ms step, 40 req/s) and a queue bound of
   128: the only errors allowed are 429s, each with ``Retry-After`` (a client waits that
   long before its next request).

The worker answers each request with its prompt reversed after a fixed step time per
batch (no model): it measures the gateway, Redis and admission, not generation.
Results (req/s, latency p50/p95/p99, status counts) go to ``loadtest.json`` and
``loadtest.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis

from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import GenerationResult, ModelInfo, WorkerInfo, dump, now

WORKER_ID = "loadtest-echo"


@dataclass
class Phase:
    name: str
    requests: int
    concurrency: int
    worker_batch: int
    worker_step_ms: float
    queue_bound: int = 128
    prompt_bytes: int = 0  # 0: a short line per request

    @property
    def worker_capacity(self) -> float:
        return round(self.worker_batch / (self.worker_step_ms / 1000), 1)


@dataclass
class PhaseResult:
    name: str
    requests: int
    concurrency: int
    queue_bound: int
    worker_capacity_req_per_s: float
    wall_s: float
    ok_per_s: float
    statuses: dict[str, int]
    errors_other_than_429: int
    all_429_have_retry_after: bool
    latency_ok_p50_s: float | None
    latency_ok_p95_s: float | None
    latency_ok_p99_s: float | None
    latency_429_p99_s: float | None
    notes: list[str] = field(default_factory=list)


# ---- the paced echo worker (runs as its own process) ------------------------------------


def _model_info() -> ModelInfo:
    """One token per byte: enough for the gateway to count prompt tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0} | {char: i + 1 for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return ModelInfo(
        name="synthetic:echo", requested="synthetic:echo", synthetic=True,
        context_length=2048, tokenizer_json=tokenizer.to_str(),
    )  # fmt: skip


def run_worker(redis_url: str, prefix: str, batch: int, step_s: float) -> None:
    """Pull up to ``batch`` requests, wait ``step_s`` (an engine step), answer, ack."""
    client, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    queue = WorkerQueue(client, keys, WORKER_ID)
    client.set(keys.model_info, dump(_model_info()))
    info = WorkerInfo(worker_id=WORKER_ID, host="loopback", pid=os.getpid(), device="cpu",
                      model="synthetic:echo", synthetic=True)  # fmt: skip
    client.hset(keys.workers, WORKER_ID, dump(info))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        client.set(keys.worker_alive(WORKER_ID), "1", ex=5)
        deliveries = queue.pull(batch, block_ms=100)
        if not deliveries:
            continue
        started = now()
        time.sleep(step_s)
        queue.publish_results([_echo(d.request, started) for d in deliveries])
        queue.ack([d.entry_id for d in deliveries])
    client.delete(keys.worker_alive(WORKER_ID))


def _echo(request: object, started: float) -> GenerationResult:
    from shared.schemas import GenerationRequest

    assert isinstance(request, GenerationRequest)
    text = request.prompt[::-1][: request.params.max_tokens]
    return GenerationResult(
        request_id=request.id, text=text, finish_reason="length", prompt_tokens=request.prompt_len,
        completion_tokens=len(text), model="synthetic:echo", worker_id=WORKER_ID,
        queued_at=request.enqueued_at, started_at=started, first_token_at=started,
    )  # fmt: skip


# ---- the load ---------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    latency_s: float
    retry_after: str | None


class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time.

    Hand-written because httpx's async pool is the bottleneck at this concurrency on a
    small machine (about 100 req/s at 64 connections against an endpoint that serves
    4,000): the load test must measure the gateway, not its client.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection now (else the first request opens it)."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body) of one request."""
        await self.connect()
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        content = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def prompt_text(index: int, size: int) -> str:
    """Request ``index``'s prompt: a short line, or ``size`` bytes (one token per byte)."""
    line = f"load test request {index}"
    return line if size <= len(line) else (line + " lorem ipsum dolor sit amet" * size)[:size]


async def _client(
    connection: Connection, jobs: asyncio.Queue[int], outcomes: list[Outcome], prompt_bytes: int
) -> None:
    while True:
        try:
            index = jobs.get_nowait()
        except asyncio.QueueEmpty:
            break
        prompt = prompt_text(index, prompt_bytes)
        body = {"model": "synthetic:echo", "prompt": prompt, "max_tokens": 8}
        start = time.perf_counter()
        try:
            status, headers, _ = await connection.post("/v1/completions", json.dumps(body).encode())
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, headers = 0, {}  # a transport error: counted as an error
            await connection.close()
        retry_after = headers.get("retry-after")
        outcomes.append(Outcome(status, time.perf_counter() - start, retry_after))
        if status == 429 and retry_after is not None:
            await asyncio.sleep(float(retry_after))
    await connection.close()


async def run_phase(port: int, phase: Phase) -> PhaseResult:
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for index in range(phase.requests):
        jobs.put_nowait(index)
    outcomes: list[Outcome] = []
    connections = [Connection(port) for _ in range(phase.concurrency)]
    await asyncio.gather(*(c.connect() for c in connections))  # before the clock starts
    start = time.perf_counter()
    await asyncio.gather(*(_client(c, jobs, outcomes, phase.prompt_bytes) for c in connections))
    return summarize(phase, outcomes, time.perf_counter() - start)


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(phase: Phase, outcomes: list[Outcome], wall_s: float) -> PhaseResult:
    statuses = Counter(str(o.status) for o in outcomes)
    ok = [o.latency_s for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    return PhaseResult(
        name=phase.name, requests=phase.requests, concurrency=phase.concurrency,
        queue_bound=phase.queue_bound, worker_capacity_req_per_s=phase.worker_capacity,
        wall_s=round(wall_s, 3),
        ok_per_s=round(len(ok) / wall_s, 1),
        statuses=dict(sorted(statuses.items())),
        errors_other_than_429=sum(1 for o in outcomes if o.status not in (200, 429)),
        all_429_have_retry_after=all(o.retry_after is not None for o in refused),
        latency_ok_p50_s=_percentile(ok, 50), latency_ok_p95_s=_percentile(ok, 95),
        latency_ok_p99_s=_percentile(ok, 99),
        latency_429_p99_s=_percentile([o.latency_s for o in refused], 99),
    )  # fmt: skip


# ---- orchestration ----------------------------------------------------------------------


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def _wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the gateway at {url} never became ready")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    phase: Phase, prefix: str, redis_url: str, env: dict[str, str], out: Path
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "experiments.loadtest", "--worker", "--prefix", prefix,
        "--redis-url", redis_url, "--worker-batch", str(phase.worker_batch),
        "--worker-step-ms", str(phase.worker_step_ms),
    ]  # fmt: skip
    return _start(argv, env, out / f"worker-{phase.name}.log")


def _run_with_services(
    phase: Phase, env: dict[str, str], url: str, port: int, redis_url: str, work: Path
) -> PhaseResult:
    """One phase against a gateway with the phase's queue bound and its echo worker."""
    env = {**env, "AEGIS_MAX_QUEUE_DEPTH": str(phase.queue_bound)}
    log = work / f"gateway-{phase.name}.log"
    gateway = _start([sys.executable, "-m", "services.gateway"], env, log)
    try:
        worker = _worker(phase, env["AEGIS_KEY_PREFIX"], redis_url, env, work)
        try:
            _wait_ready(url)
            return asyncio.run(run_phase(port, phase))
        finally:
            _stop(worker)
    finally:
        _stop(gateway)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("results/loadtest"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--queue-bound", type=int, default=128, help="of the overload phase")
    parser.add_argument("--burst", type=int, default=1024, help="requests of the burst phase")
    parser.add_argument(
        "--gateway-processes", type=int, default=1, help="AEGIS_GATEWAY_PROCESSES (0: one per core)"
    )
    parser.add_argument(
        "--prompt-bytes", type=int, default=0,
        help="prompt size (one token per byte; W1's are 64-512 tokens); 0: a short line",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--worker-step-ms", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.redis_url, args.prefix, args.worker_batch, args.worker_step_ms / 1000)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # Process logs and the gateway's SQLite file stay out of the committed results.
    work = Path(tempfile.mkdtemp(prefix="aegis-loadtest-"))
    prefix, port = f"aegis-loadtest-{uuid.uuid4().hex[:8]}", _free_port()
    env = {
        "AEGIS_REDIS_URL": args.redis_url, "AEGIS_KEY_PREFIX": prefix,
        "AEGIS_GATEWAY_PORT": str(port), "AEGIS_LOG_LEVEL": "WARNING",
        "AEGIS_DATA_DIR": str(work / "data"),
        "AEGIS_GATEWAY_PROCESSES": str(args.gateway_processes),
    }  # fmt: skip
    phases = [
        Phase("steady", args.requests, 64, worker_batch=64, worker_step_ms=10,
              queue_bound=args.queue_bound),
        Phase("burst", args.burst, args.burst, worker_batch=args.burst, worker_step_ms=10,
              queue_bound=args.burst),
        Phase("overload", args.requests, 256, worker_batch=8, worker_step_ms=200,
              queue_bound=args.queue_bound),
    ]  # fmt: skip
    for phase in phases:
        phase.prompt_bytes = args.prompt_bytes
    url, results = f"http://127.0.0.1:{port}", []
    try:
        for phase in phases:
            results.append(_run_with_services(phase, env, url, port, args.redis_url, work))
    finally:
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
    setup = {
        "requests_per_phase": args.requests, "burst": args.burst,
        "gateway_processes": args.gateway_processes, "prompt_bytes": args.prompt_bytes,
        "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.platform(),
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    write_report(args.out, setup, results)
    print(f"report in {args.out}, process logs in {work}")
    if any(r.errors_other_than_429 or not r.all_429_have_retry_after for r in results):
        raise SystemExit("errors other than 429 with Retry-After: see the report")


def _prompts(size: object) -> str:
    return f"prompts of {size} bytes (tokens)" if size else "one-line prompts"


def _processes(count: object) -> str:
    return "one process per core" if count == 0 else f"{count} process{'es' if count != 1 else ''}"


def write_report(out: Path, setup: dict[str, object], results: list[PhaseResult]) -> None:
    (out / "loadtest.json").write_text(
        json.dumps({"setup": setup, "phases": [asdict(r) for r in results]}, indent=2) + "\n"
    )
    lines = [
        "# Gateway load test (loopback)",
        "",
        f"`python -m experiments.loadtest` on {setup['ts']}: {setup['cpus']} CPUs shared with "
        "other work (the clients, the gateway, Redis and the worker all on them), a gateway "
        f"of {_processes(setup.get('gateway_processes', 1))} and a paced echo worker process "
        f"(a fixed step time per batch, no model), {_prompts(setup.get('prompt_bytes', 0))}, "
        "8-token completions. Each phase has a "
        "gateway of its own, started with the phase's queue bound (in sequences); its "
        "clients' connections are open before the clock starts. In the burst, every "
        "request is sent at once (the gateway's cost per request, admission to answer).",
        "",
        "| phase | requests | concurrent | queue bound | worker req/s at most | wall s "
        "| ok req/s | statuses | errors other than 429 | every 429 has Retry-After | p50 s "
        "| p95 s | p99 s | 429 p99 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{k}: {v}" for k, v in r.statuses.items())
        lines.append(
            f"| {r.name} | {r.requests} | {r.concurrency} | {r.queue_bound} | "
            f"{r.worker_capacity_req_per_s} | "
            f"{r.wall_s} | {r.ok_per_s} | "
            f"{statuses} | {r.errors_other_than_429} | {r.all_429_have_retry_after} | "
            f"{r.latency_ok_p50_s} | {r.latency_ok_p95_s} | {r.latency_ok_p99_s} | "
            f"{r.latency_429_p99_s} |"
        )
    lines += [
        "",
        "Latencies are those of the 200 answers (client side, end to end); a client that got a "
        "429 waited its Retry-After before its next request. In the overload, admission "
        "refuses past the bound (backlog plus what the worker holds), so the answered "
        "requests' latency stays near bound / worker capacity "
        f"({results[-1].queue_bound} / {results[-1].worker_capacity_req_per_s} req/s) instead of "
        "growing with the offered load.",
        "",
    ]
    (out / "loadtest.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
