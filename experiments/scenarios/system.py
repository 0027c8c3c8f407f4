"""System: W1 through the whole request path vs AEGIS's engine alone on the same load.

Starts Redis (when none answers; a carried ``.device/redis/redis-server`` is found),
the gateway (``python -m services.gateway``) and one worker (``python -m
services.worker``) as processes with their own key prefix, port and SQLite file, then
fires every request at once at ``/v1/completions`` from several client processes
(:mod:`experiments.client`: keep-alive connections opened before the clock starts) and
waits for all answers. The engine alone then runs the same token ids at the same batch
size with the worker's look-ahead, in this process. The ratio shows the system's overhead (HTTP,
tokenizing, Redis streams, result delivery, records).

Prompts travel as text: each request's random ids are decoded, and the engine alone is
given the ids the gateway's tokenizer makes of that text, so both run the same tokens.
EOS: the gateway has no field to ignore it (``ignore_eos`` is sent and dropped); a
random-weight model rarely emits it, and completions that stop early are counted.
A 429 or 503 (queue bound, the gateway's Redis connections) is retried after 0.1 s,
as a client would; the retries are counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from experiments.client import Answer, Monitor, post_all
from experiments.context import BenchContext
from experiments.measure import ROOT, RunResult
from experiments.scenarios.common import ratio, runner, settings
from shared.config import CommonSettings
from shared.keys import Keys
from shared.redis_server import ensure_redis
from shared.schemas import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

CARRIED_REDIS = ROOT / ".device" / "redis"
READY_TIMEOUT_S = 300.0
# AEGIS_GATEWAY_PROCESSES of the gateway, unless the scenario's config says otherwise.
GATEWAY_PROCESSES = 4
# Load client processes (experiments.client), unless the scenario's config says otherwise.
CLIENT_PROCESSES = 4
# Set: the system scenario runs its load a second time with the worker under cProfile.
PROFILE_ENV = "AEGIS_BENCH_PROFILE_WORKER"
WARM_UP_PER_PROCESS = 4
# With ``control``: the monitor (telemetry: every process's GPU memory) and the agent.
CONTROL_SERVICES = ("monitor", "agent")


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("system")
    batch = int(cfg["batch_size"])
    texts, requests = _prompts(ctx, cfg["workload"])
    repeats = int(cfg.get("repeats", 1))
    systems = _system_runs(ctx, batch, texts, requests, repeats)
    engines = []
    for _ in range(repeats):
        with ctx.bar(len(requests), "engine alone") as bar:
            engine, _ = runner(ctx).run(requests, settings(ctx, batch), system="aegis_engine",
                                        bar=bar)  # fmt: skip
        engines.append(engine)
    system, engine = _median(systems), _median(engines)
    if os.environ.get(PROFILE_ENV):
        system.extra["profiled"] = _profiled(ctx, batch, texts, requests)
    other_counts = [int(p) for p in cfg.get("more_gateway_processes", [])]
    gateways = []
    for count in other_counts:
        runs = _system_runs(ctx, batch, texts, requests, repeats, count)
        gateways.append(_gateway_point(_median(runs), count, engine))
    return {
        "workload": cfg["workload"],
        "config": cfg,
        "system": system.to_dict(),
        "engine": engine.to_dict(),
        "ratio_system_vs_engine": ratio(system.tokens_per_s, engine.tokens_per_s),
        "gateway_processes": int(cfg.get("gateway_processes", GATEWAY_PROCESSES)),
        "gateway_serving_on": serving_on(ctx.out / "logs" / "gateway.log"),
        "more_gateway_processes": gateways,
    }


def serving_on(log_file: Path) -> str:
    """The event loop and HTTP parser the gateway's processes said they serve on (its
    start-up line: uvloop and httptools, or a warning naming the fallback)."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    lines = {line.split(": ", 1)[-1].strip() for line in text.splitlines()
             if "serving on" in line}  # fmt: skip
    return "; ".join(sorted(lines)) or "unknown (no start-up line in the gateway's log)"


def _system_runs(
    ctx: BenchContext,
    batch: int,
    texts: list[str],
    requests: list[GenerationRequest],
    repeats: int,
    gateway_processes: int | None = None,
    profile: bool = False,
) -> list[RunResult]:
    """``repeats`` runs of the load through one set of services, each with its timeline;
    with ``profile`` the worker runs under cProfile (``logs-profiled/worker.prof``)."""
    env = {} if gateway_processes is None else {"AEGIS_GATEWAY_PROCESSES": str(gateway_processes)}
    logs = "logs" if gateway_processes is None else f"logs-gateway-{gateway_processes}"
    logs = "logs-profiled" if profile else logs
    with Services(ctx, batch, env=env, logs=logs, profile_workers=profile) as services:
        runs = [services.fire(texts, requests) for _ in range(repeats)]
    # After the services stopped: the worker's record writer has flushed every request.
    for run_ in runs:
        start = run_.extra["started_at"]
        run_.extra["timeline"] = request_timeline(services.database, start, run_.tokens,
                                                  until=start + run_.seconds)  # fmt: skip
    return runs


def _gateway_point(run_: RunResult, processes: int, engine: RunResult) -> dict[str, Any]:
    """The system with another gateway process count, against the same engine figure."""
    return {
        "processes": processes,
        "tokens_per_s": round(run_.tokens_per_s, 1),
        "runs_tokens_per_s": run_.extra["runs_tokens_per_s"],
        "ratio_system_vs_engine": ratio(run_.tokens_per_s, engine.tokens_per_s),
        "failed": run_.failed,
        "timeline": run_.extra["timeline"],
    }


def _median(runs: list[RunResult]) -> RunResult:
    """The run of median tokens/s (the upper one of an even count); every run's figure
    is kept in its ``extra``: one pass of W1 lasts 1.5-2.5 s on an H200, and the engine
    alone measured 32k and 45k tok/s in two runs of the same code."""
    ranked = sorted(runs, key=lambda r: r.tokens_per_s)
    chosen = ranked[len(ranked) // 2]
    chosen.extra["runs_tokens_per_s"] = [round(r.tokens_per_s, 1) for r in runs]
    return chosen


def _profiled(
    ctx: BenchContext, batch: int, texts: list[str], requests: list[GenerationRequest]
) -> dict[str, Any]:
    """The same load again with the worker under cProfile (its main thread: the serving
    loop), after the timed run; ``logs-profiled/worker.prof`` shows where its time went.
    Profiling slows Python code, so these figures are not comparable with the timed run."""
    [result] = _system_runs(ctx, batch, texts, requests, 1, profile=True)
    return {"seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            "profile": str(ctx.out / "logs-profiled" / "worker.prof")}  # fmt: skip


def _prompts(ctx: BenchContext, workload: str) -> tuple[list[str], list[GenerationRequest]]:
    """Prompt texts, and requests holding the ids the gateway will make of them."""
    texts, requests = [], []
    for _, phase in ctx.requests(workload):
        for r in phase:
            text, ids = _text_of(ctx, r.prompt_token_ids)
            texts.append(text)
            params = SamplingParams(max_tokens=r.params.max_tokens, temperature=0.0)
            requests.append(
                GenerationRequest(id=r.id, prompt=text, prompt_token_ids=ids, params=params)
            )
    return texts, requests


def _text_of(ctx: BenchContext, ids: list[int]) -> tuple[str, list[int]]:
    """Text whose encoding (BOS included) is at most ``len(ids)`` tokens, and that encoding.

    Random ids decode to text that re-encodes longer (byte pieces merge differently), so
    the ids are cut until the text fits the workload's prompt length.
    """
    tokenizer = ctx.model().tokenizer
    target, body = len(ids), ids[1:]
    while True:
        text = str(tokenizer.decode(body))
        encoded = list(tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids)
        if len(encoded) <= target or len(body) <= 1:
            return text, encoded
        body = body[: max(1, min(len(body) - 1, len(body) * target // len(encoded)))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Services:
    """Redis (if needed), a gateway and workers as processes; logs under ``<out>/<logs>``.

    ``workers``: how many workers to start (1: one named ``worker``, as the system
    scenario has it), or one dict of extra environment per worker (``worker-0``,
    ``worker-1``...: e.g. ``CUDA_VISIBLE_DEVICES``, ``AEGIS_GPU_MEMORY_FRACTION``). Each
    worker has its own id (``<prefix>-<name>``), metrics port and log file. ``env`` goes
    to every process. With ``stagger`` each worker is up (its heartbeat is in Redis)
    before the next one starts: a GPU's second worker then profiles its memory with the
    first one's already taken. With ``control`` the monitor and the agent run too
    (before the workers), and the agent sets the workers' settings live.
    :meth:`add_worker`, :meth:`stop_worker` and :meth:`kill_worker` (SIGKILL, a crash)
    change the set while the services run.
    """

    def __init__(
        self,
        ctx: BenchContext,
        batch: int,
        workers: int | Sequence[Mapping[str, str]] = 1,
        env: Mapping[str, str] | None = None,
        logs: str = "logs",
        stagger: bool = False,
        profile_workers: bool = False,
        control: bool = False,
    ) -> None:
        self.ctx = ctx
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.prefix)
        self.redis_url = CommonSettings().redis_url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = ctx.out / logs
        self.env = self._env(batch)
        self.env.update(env or {})
        envs = [{} for _ in range(workers)] if isinstance(workers, int) else list(workers)
        self.initial = [("worker" if workers == 1 else None, extra) for extra in envs]
        self.stagger = stagger
        self.profile_workers = profile_workers
        self.control = CONTROL_SERVICES if control else ()
        self.client_processes = int(ctx.config("system").get("client_processes", CLIENT_PROCESSES))
        self.redis: subprocess.Popen[bytes] | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log_files: list[IO[bytes]] = []
        self.worker_ids: dict[str, str] = {}  # name -> worker id, every worker ever started
        self.worker_env: dict[str, dict[str, str]] = {}  # name -> its extra environment
        self.killed: dict[str, int] = {}  # name -> pid of a worker killed on purpose
        self.startup_s: dict[str, float] = {}  # name -> seconds from start to heartbeat
        self._started_at: dict[str, float] = {}

    def _env(self, batch: int) -> dict[str, str]:
        ctx = self.ctx
        return {
            **os.environ,
            "AEGIS_REDIS_URL": self.redis_url,
            "AEGIS_KEY_PREFIX": self.prefix,
            "AEGIS_GATEWAY_PORT": str(self.port),
            "AEGIS_DATABASE_URL": f"sqlite:///{(ctx.out / 'system.db').resolve()}",
            "AEGIS_DATA_DIR": str((ctx.out / "system-data").resolve()),
            "AEGIS_MODEL": ctx.model_name,
            "AEGIS_DEVICE": ctx.device,
            "AEGIS_PRECISION": ctx.precision,
            "AEGIS_BATCH_SIZE": str(batch),
            "AEGIS_MAX_BATCHED_TOKENS": str(ctx.max_batched_tokens),
            "AEGIS_KV_BUDGET_BYTES": str(ctx.kv_budget_bytes),
            "AEGIS_WORKER_ID": f"{self.prefix}-worker",
            "AEGIS_LOG_LEVEL": "INFO",  # one line per window of steps: the run's timeline
            "AEGIS_MAX_QUEUE_DEPTH": "100000",
            "AEGIS_GATEWAY_PROCESSES": str(
                ctx.config("system").get("gateway_processes", GATEWAY_PROCESSES)
            ),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def __enter__(self) -> Services:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = ensure_redis(self.redis_url, self.ctx.out / "redis", bundled=CARRIED_REDIS)
            self._start("gateway", "services.gateway", self.env)
            for service in self.control:  # before the workers: it sees them from their start
                self._start(service, f"services.{service}", self.env)
            for name, extra in self.initial:
                self.add_worker(extra, wait=self.stagger, name=name)
            self._wait_ready()
            self.wait_workers()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        workers = self.workers()
        for name in workers:  # all at once: each drains (briefly, idle) in parallel
            if self.children[name].poll() is None:
                self.children[name].send_signal(signal.SIGTERM)
        for name in [*workers, *self.control, "gateway"]:
            process = self.children.pop(name, None)
            if process is not None:
                _stop(process)
        for handle in self.log_files:
            handle.close()
        self._clean_keys()
        if self.redis is not None:
            _stop(self.redis)
            self.redis = None

    def _start(
        self, name: str, module: str, env: Mapping[str, str], profile: Path | None = None
    ) -> None:
        log_file = (self.logs / f"{name}.log").open("wb")
        self.log_files.append(log_file)
        self._started_at[name] = time.monotonic()
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        self.children[name] = subprocess.Popen(
            [sys.executable, *profiler, "-m", module],
            cwd=ROOT,
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    # -- workers -------------------------------------------------------------------------

    def workers(self) -> list[str]:
        """Names of the worker processes started and neither stopped nor killed."""
        return [name for name in self.worker_ids if name in self.children]

    def add_worker(
        self, extra: Mapping[str, str] | None = None, wait: bool = True, name: str | None = None
    ) -> str:
        """Start one more worker (``worker-<n>``) with ``extra`` environment; with ``wait``,
        return once its heartbeat is in Redis (model loaded, graphs captured)."""
        name = name or f"worker-{len(self.worker_ids)}"
        worker_id = f"{self.prefix}-{name}"
        self.worker_ids[name] = worker_id
        self.worker_env[name] = {key: str(value) for key, value in (extra or {}).items()}
        env = {
            **self.env,
            "AEGIS_WORKER_ID": worker_id,
            "AEGIS_WORKER_METRICS_PORT": str(_free_port()),
            **self.worker_env[name],
        }
        profile = self.logs / f"{name}.prof" if self.profile_workers else None
        self._start(name, "services.worker", env, profile)
        if wait:
            self.wait_workers()
        return name

    def wait_workers(self) -> None:
        """Wait until every running worker has announced itself (its heartbeat key)."""
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            waiting = [n for n in self.workers() if n not in self.startup_s]
            for name in waiting:
                if self.children[name].poll() is not None:
                    code = self.children[name].returncode
                    raise RuntimeError(f"{name} exited ({code}): {self._tail(name)}")
                if client.exists(self.keys.worker_alive(self.worker_ids[name])):
                    self.startup_s[name] = round(time.monotonic() - self._started_at[name], 2)
            if all(n in self.startup_s for n in waiting):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {waiting} not up after {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.2)

    def stop_worker(self, name: str) -> None:
        """SIGTERM: the worker finishes or hands back what it holds, then exits."""
        _stop(self.children.pop(name))

    def kill_worker(self, name: str) -> int:
        """SIGKILL, as a crash: nothing is finished or handed back. Returns its pid."""
        process = self.children.pop(name)
        process.kill()
        process.wait(30)
        self.killed[name] = process.pid
        return process.pid

    def exited(self) -> dict[str, int]:
        """Workers that ended by themselves (a crash, an uncaught OOM): name -> exit code."""
        return {
            n: self.children[n].returncode
            for n in self.workers()
            if self.children[n].poll() is not None
        }

    def consumer(self, name: str) -> str:
        """The worker's consumer in the stream's group (``<worker id>:<pid>``)."""
        process = self.children.get(name)
        pid = process.pid if process is not None else self.killed[name]
        return f"{self.worker_ids[name]}:{pid}"

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.children.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}): {self._tail(name)}")
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        tails = "; ".join(f"{n}: {self._tail(n)}" for n in self.workers())
        raise RuntimeError(f"system not ready after {READY_TIMEOUT_S:.0f}s: {tails}")

    def _tail(self, name: str) -> str:
        return self.log_text(name)[-2000:]

    def _clean_keys(self) -> None:
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            for key in client.scan_iter(f"{self.prefix}*", count=1000):
                client.delete(key)
        except Exception as exc:  # cleanup only: never hide the benchmark's result
            log.warning("could not delete the benchmark's Redis keys: %s", exc)

    @property
    def database(self) -> Path:
        """The SQLite file the services record into."""
        return self.ctx.out / "system.db"

    def fire(self, texts: list[str], requests: list[GenerationRequest]) -> RunResult:
        """Every prompt at once, after a few warm-up requests (not timed) that reach each
        gateway process (the kernel spreads connections over them) and the worker."""
        self.warm_up(WARM_UP_PER_PROCESS * int(self.env["AEGIS_GATEWAY_PROCESSES"]))
        result, _ = self.load(texts, [r.params.max_tokens for r in requests])
        return result

    def warm_up(self, count: int = 1) -> None:
        """``count`` short requests at once, not timed (more than one: some for each worker)."""
        asyncio.run(post_all(self.port, ["warm up"] * count, [2] * count, self.client_processes))

    def load(
        self, texts: list[str], budgets: list[int], monitor: Monitor | None = None
    ) -> tuple[RunResult, list[Answer | None]]:
        """Every prompt at once, ``monitor`` running beside; the figures and each answer."""
        load = asyncio.run(post_all(self.port, texts, budgets, self.client_processes, monitor))
        answers = load.answers
        result = RunResult("aegis_system", len(texts), seconds=load.end - load.start)
        result.batch_size = int(self.env["AEGIS_BATCH_SIZE"])
        early = retries = 0
        for answer, budget in zip(answers, budgets, strict=True):
            if answer is None:
                result.failed += 1
                continue
            result.completed += 1
            result.tokens += min(answer.tokens, budget)
            early += answer.finish_reason != "length"
            retries += answer.retries
        result.extra = {
            "stopped_before_max_tokens": early,
            "retried_429_503": retries,
            "started_at": load.started_at,
            "client_processes": self.client_processes,
        }
        return result, answers


def request_timeline(
    database: Path, started_at: float, tokens: int, until: float = float("inf")
) -> dict[str, Any]:
    """Where a load's time went, from the worker's request records (wall-clock seconds
    after the client's first request): when the gateway queued the first and the last
    request, when the worker began the first, and when it finished the last; the rest of
    the client's time is the answers' way back. ``server_tokens_per_s`` counts from the
    first request queued to the last one finished."""
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT COUNT(*), MIN(queued_at), MAX(queued_at), MIN(started_at), "
            "MAX(finished_at) FROM requests WHERE queued_at >= ? AND queued_at < ?",
            (started_at, until),
        ).fetchone()
    count, first_queued, last_queued, first_started, last_finished = row
    if not count:
        return {"requests": 0}
    span = last_finished - first_queued
    return {
        "requests": count,
        "first_queued_s": round(first_queued - started_at, 4),
        "last_queued_s": round(last_queued - started_at, 4),
        "first_started_s": round(first_started - started_at, 4),
        "last_finished_s": round(last_finished - started_at, 4),
        "server_tokens_per_s": round(tokens / span, 1) if span > 0 else None,
    }


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
