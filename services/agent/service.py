"""The agent loop: telemetry + worker events in, versioned control settings out.

Each turn (:meth:`AgentService.step`):

1. XREAD the worker events stream (``kind`` = ``cycle`` | ``oom``, ``data`` = JSON) and
   the telemetry stream from where the last turn stopped (at start: from the streams'
   current ends, so old OOMs are not replayed; ``replay_events`` reads from the start).
2. A worker seen for the first time gets a :class:`WorkerControlState`; a worker with no
   control hash gets the default settings written.
3. For each worker with new events, or new telemetry while it is active, the policy
   decides; a change is written with :meth:`ControlStore.write` (versioned hash +
   PUBLISH), recorded as a :class:`Decision` and logged as one line.

Bad stream entries are logged and skipped; a Redis outage is logged and retried. The
worker's GPU is found from its announcement (``Keys.workers``: host, pid, GPU index)
or its cycles' ``gpu_index``; its own memory is told apart from other processes' by pid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import redis
from pydantic import BaseModel, ValidationError

from services.agent.config import AgentSettings
from services.agent.memory_model import MemoryModel
from services.agent.policy import (
    AgentPolicy,
    MemoryView,
    Observation,
    PolicyDecision,
    WorkerControlState,
    cycle_memory_view,
    memory_view,
)
from shared.control import ControlStore
from shared.events import parse_event
from shared.keys import Keys
from shared.lifecycle import Stoppable
from shared.replies import as_text
from shared.schemas import (
    CycleStats,
    Decision,
    GpuSample,
    OomEvent,
    TelemetrySample,
    WorkerInfo,
    load,
)

log = logging.getLogger(__name__)

FIELD = b"data"
READ_COUNT = 1000


class Recorder(Protocol):
    """What the agent needs of the records writer: a non-blocking submit."""

    def submit(self, record: BaseModel) -> None: ...


@dataclass
class _Worker:
    """A worker as the agent follows it."""

    state: WorkerControlState
    info: WorkerInfo | None = None
    cycles: list[CycleStats] = field(default_factory=list)
    ooms: list[OomEvent] = field(default_factory=list)
    last_event_ts: float = 0.0
    last_cycle: CycleStats | None = None


class AgentService(Stoppable):
    """Runs the policy for every worker seen on the events stream; see the module doc."""

    def __init__(
        self,
        settings: AgentSettings,
        client: redis.Redis,
        recorder: Recorder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.client = client
        self.recorder = recorder
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        self.control = ControlStore(client, self.keys)
        self.policy = AgentPolicy(settings.policy_config())
        self.workers: dict[str, _Worker] = {}
        self.telemetry: dict[str, TelemetrySample] = {}  # host -> latest sample
        super().__init__()
        self.last_ids: dict[str, str] = {}
        self._fresh_telemetry = False
        self._redis_down = False
        self._start_positions()

    # -- reading -----------------------------------------------------------------------

    def _start_positions(self) -> None:
        """Read from now on (or from the start), beginning with the latest telemetry."""
        for stream in (self.keys.events_stream, self.keys.telemetry_stream):
            self.last_ids[stream] = "0-0"
            if self.settings.replay_events:
                continue
            try:
                last: Any = self.client.xrevrange(stream, count=1)
            except redis.RedisError as exc:
                log.warning("cannot read %s yet (%s); starting from its beginning", stream, exc)
                continue
            if last:
                self.last_ids[stream] = as_text(last[0][0])
                if stream == self.keys.telemetry_stream:
                    self._on_telemetry(last[0][1])

    def poll(self, block_ms: int | None = None) -> int:
        """Read new entries of both streams (waiting up to ``block_ms``); how many."""
        block = self.settings.agent_poll_ms if block_ms is None else block_ms
        streams: dict[Any, Any] = dict(self.last_ids)
        reply: Any = self.client.xread(streams, count=READ_COUNT, block=block or None)
        count = 0
        for stream, entries in reply or []:
            name = as_text(stream)
            for entry_id, fields in entries:
                self.last_ids[name] = as_text(entry_id)
                count += 1
                if name == self.keys.events_stream:
                    self._on_event(fields)
                else:
                    self._on_telemetry(fields)
        return count

    def _on_telemetry(self, fields: dict[bytes, bytes]) -> None:
        try:
            sample = load(TelemetrySample, fields[FIELD])
        except (KeyError, ValidationError) as exc:
            log.warning("skipping a bad telemetry entry: %s", str(exc).splitlines()[0])
            return
        self.telemetry[sample.host] = sample
        self._fresh_telemetry = True

    def _on_event(self, fields: dict[bytes, bytes]) -> None:
        try:
            event = parse_event(fields)
        except (KeyError, ValueError) as exc:  # ValidationError is a ValueError
            log.warning("skipping a bad worker event: %s", str(exc).splitlines()[0])
            return
        if event is None:
            log.warning("skipping a worker event of unknown kind %r", fields.get(b"kind"))
            return
        worker = self._worker(event.worker_id)
        worker.last_event_ts = self.clock()
        if isinstance(event, CycleStats):
            worker.cycles.append(event)
            worker.last_cycle = event
        else:
            worker.ooms.append(event)

    def _worker(self, worker_id: str) -> _Worker:
        """The worker's record, created (and its settings initialised) on first sight."""
        worker = self.workers.get(worker_id)
        if worker is None:
            settings = self.control.initialise(worker_id, self.settings.default_settings())
            model = MemoryModel(prior=self.settings.prior())
            state = WorkerControlState(worker_id, settings, model=model)
            worker = self.workers[worker_id] = _Worker(state, self._info(worker_id))
            if worker.info is not None:
                state.context_length = worker.info.context_length
            log.info(
                "worker %s found: v%d batch %d, %s, max_seq_len %d",
                worker_id, settings.version, settings.batch_size, settings.precision,
                settings.max_seq_len,
            )  # fmt: skip
        return worker

    def _info(self, worker_id: str) -> WorkerInfo | None:
        raw: Any = self.client.hget(self.keys.workers, worker_id)
        if not raw:
            return None
        try:
            return load(WorkerInfo, raw)
        except ValidationError:
            log.warning("worker %s: unreadable announcement; GPU matched by index only", worker_id)
            return None

    # -- deciding ----------------------------------------------------------------------

    def memory_of(self, worker: _Worker) -> MemoryView | None:
        """The worker's GPU from fresh telemetry, else from its last cycle's own NVML
        reading, else ``None`` (no GPU: the policy then goes by throughput alone)."""
        view = self._telemetry_view(worker)
        if view is None and worker.last_cycle is not None:
            view = cycle_memory_view(worker.last_cycle, self.settings.overhead_bytes)
        return view

    def _telemetry_view(self, worker: _Worker) -> MemoryView | None:
        info = worker.info
        sample = self.telemetry.get(info.host) if info else None
        if sample is None and len(self.telemetry) == 1:
            sample = next(iter(self.telemetry.values()))
        if sample is None or self.clock() - sample.ts > self.settings.telemetry_max_age_s:
            return None
        cycle = worker.last_cycle
        gpu = _gpu_of(worker, sample)
        if gpu is None:
            return None
        pid = info.pid if info else None
        view = memory_view(gpu, pid, cycle, self.settings.overhead_bytes)
        peers = self._peer_bytes(worker, info.host if info else None, gpu)
        if not peers:
            return view
        return replace(view, peer_workers=len(peers), peer_bytes=sum(peers))

    def _peer_bytes(self, worker: _Worker, host: str | None, gpu: GpuSample) -> list[int]:
        """What each other AEGIS worker of this host on this GPU holds: NVML's figure for
        its pid; else, for a live worker on the GPU of this UUID (a container's pid is
        not the host's, so NVML does not list it), its last cycle's own reading."""
        procs = gpu.process_memory_bytes
        own = worker.info.pid if worker.info else None
        held = []
        for other in self.workers.values():
            info = other.info
            if other is worker or info is None or info.host != host:
                continue
            if info.pid in procs and info.pid != own:
                held.append(procs[info.pid])
            elif gpu.uuid is not None and _uuid_of(other) == gpu.uuid:
                reading = self._held_by(other)
                if reading is not None:
                    held.append(reading)
        return held

    def _held_by(self, worker: _Worker) -> int | None:
        """A worker's memory as its last cycle read it (plus the CUDA context), if it is
        alive (its heartbeat: a dead worker's memory went with it)."""
        cycle = worker.last_cycle
        if cycle is None:
            return None
        reading = cycle.memory_reserved_bytes or cycle.memory_peak_bytes
        if not reading or not self.client.exists(self.keys.worker_alive(cycle.worker_id)):
            return None
        return reading + self.settings.overhead_bytes

    def decide_all(self) -> list[Decision]:
        """Run the policy for every worker with something new; the decisions made."""
        now = self.clock()
        telemetry, self._fresh_telemetry = self._fresh_telemetry, False
        made = []
        for worker_id, worker in self.workers.items():
            active = now - worker.last_event_ts <= self.settings.worker_idle_s
            if not (worker.cycles or worker.ooms or (telemetry and active)):
                continue
            if worker.info is None:  # announced after its first event, perhaps
                worker.info = self._info(worker_id)
                worker.state.context_length = worker.info.context_length if worker.info else None
            obs = Observation(now, self.memory_of(worker), worker.cycles, worker.ooms)
            worker.cycles, worker.ooms = [], []
            decision = self.policy.decide(worker.state, obs)
            if decision is not None:
                made.append(self._apply(worker_id, worker, decision, now))
        return made

    def _apply(
        self, worker_id: str, worker: _Worker, decision: PolicyDecision, now: float
    ) -> Decision:
        """Write the new settings (versioned, announced), record and log the decision."""
        stored = self.control.write(worker_id, decision.after)
        worker.state.adopt(stored, now)
        record = decision.to_schema(worker_id, now).model_copy(update={"after": stored})
        if self.recorder is not None:
            self.recorder.submit(record)
        log.info("worker %s v%d: %s", worker_id, stored.version, decision.summary())
        return record

    # -- loop --------------------------------------------------------------------------

    def step(self, block_ms: int | None = None) -> list[Decision]:
        """One turn: read, decide, write. Redis failures are logged, not raised."""
        try:
            self.poll(block_ms)
            made = self.decide_all()
        except redis.RedisError as exc:
            if not self._redis_down:
                log.error("Redis unavailable (%s); retrying", exc)
            self._redis_down = True
            self.stopping.wait(1.0)
            return []
        if self._redis_down:
            log.info("Redis is back")
        self._redis_down = False
        return made

    def run(self) -> None:
        """Turn until :meth:`stop`."""
        cfg = self.policy.config
        log.info(
            "agent started: grow < %.0f%%, shrink > %.0f%%, batch %d..%d",
            100 * cfg.low_watermark, 100 * cfg.high_watermark, cfg.min_batch, cfg.max_batch,
        )  # fmt: skip
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:  # one bad turn must not end the agent
                log.exception("agent turn failed")
                self.stopping.wait(1.0)
        log.info("agent stopped")


def _uuid_of(worker: _Worker) -> str | None:
    cycle, info = worker.last_cycle, worker.info
    return (cycle.gpu_uuid if cycle else None) or (info.gpu_uuid if info else None)


def _gpu_of(worker: _Worker, sample: TelemetrySample) -> GpuSample | None:
    """The worker's GPU in a monitor sample: by UUID, which holds when the worker sees
    only its own GPU (a container with one GPU, CUDA_VISIBLE_DEVICES: cuda:0 there is
    any index here), else by index; a sample of one GPU is a worker's without either."""
    cycle, info = worker.last_cycle, worker.info
    uuid = _uuid_of(worker)
    if uuid is not None:
        found = next((g for g in sample.gpus if g.uuid == uuid), None)
        if found is not None or any(g.uuid for g in sample.gpus):
            return found  # a UUID the monitor does not list: another host's GPU
    index = cycle.gpu_index if cycle and cycle.gpu_index is not None else None
    if index is None and info is not None:
        index = info.gpu_index
    gpu = next((g for g in sample.gpus if g.index == index), None)
    if gpu is None and len(sample.gpus) == 1 and index is None:
        gpu = sample.gpus[0]
    return gpu
