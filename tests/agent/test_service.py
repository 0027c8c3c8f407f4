"""The agent service on a real Redis, recording to a real SQLite file."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.agent.config import AgentSettings
from services.agent.service import AgentService
from shared.control import ControlStore
from shared.db import Records, RecordWriter, open_records
from shared.events import publish_event
from shared.keys import Keys
from shared.schemas import (
    CycleStats,
    GpuSample,
    OomEvent,
    TelemetrySample,
    WorkerInfo,
    dump,
    gpu_uuid_key,
)

GIB = 1 << 30
WORKER = "w1"
PID = os.getpid()


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    store = open_records(f"sqlite:///{tmp_path / 'aegis.db'}")
    yield store
    store.close()


@pytest.fixture
def writer(records: Records) -> Iterator[RecordWriter]:
    w = RecordWriter(records, flush_interval_s=0.05)
    yield w
    w.close()


def settings_for(key_prefix: str, redis_url: str) -> AgentSettings:
    return AgentSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        grow_cooldown_s=0.0,
        grow_cooldown_cycles=2,
        default_batch_size=8,
    )


def cycle(batch: int, version: int, peak: int = 4 * GIB) -> CycleStats:
    return CycleStats(
        worker_id=WORKER, gpu_index=0, settings_version=version, batch_size=batch,
        max_prompt_len=200, mean_prompt_len=150, max_new_tokens=100, precision="bf16",
        max_seq_len=2048, tokens_generated=batch * 100, tokens_per_s=50.0 * batch,
        latency_s=1.0, padding_ratio=0.1, memory_peak_bytes=peak, queue_depth=20,
    )  # fmt: skip


def telemetry(used: int, worker_bytes: int, other_bytes: int = 0) -> TelemetrySample:
    procs = {PID: worker_bytes} | ({PID + 1: other_bytes} if other_bytes else {})
    gpu = GpuSample(
        index=0, name="H100", memory_used_bytes=used, memory_total_bytes=80 * GIB,
        process_memory_bytes=procs,
    )  # fmt: skip
    return TelemetrySample(host="gpu-host", gpu="nvml", gpus=[gpu])


def announce(client: redis.Redis, keys: Keys) -> None:
    info = WorkerInfo(
        worker_id=WORKER, host="gpu-host", pid=PID, device="cuda:0", gpu_index=0,
        model="synthetic:tiny", synthetic=True,
    )  # fmt: skip
    client.hset(keys.workers, WORKER, dump(info))


def send_telemetry(client: redis.Redis, keys: Keys, sample: TelemetrySample) -> None:
    client.xadd(keys.telemetry_stream, {"data": dump(sample)})


def test_events_and_telemetry_become_versioned_settings_and_records(
    redis_client: redis.Redis,
    keys: Keys,
    key_prefix: str,
    redis_url: str,
    writer: RecordWriter,
    records: Records,
    caplog: pytest.LogCaptureFixture,
) -> None:
    announce(redis_client, keys)
    service = AgentService(settings_for(key_prefix, redis_url), redis_client, writer)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.control_channel)
    assert pubsub.get_message(timeout=2.0) is not None  # subscribe confirmation

    send_telemetry(redis_client, keys, telemetry(used=5 * GIB, worker_bytes=5 * GIB))
    for _ in range(2):
        publish_event(redis_client, keys, cycle(8, version=1), maxlen=1000)
    with caplog.at_level(logging.INFO, logger="services.agent.service"):
        made = service.step(block_ms=200)

    store = ControlStore(redis_client, keys)
    current = store.read(WORKER)
    assert current is not None
    # Version 1: defaults written on discovery; version 2: the agent's decision.
    assert current.version == 2
    assert current.batch_size > 8 and current.reason == made[0].reason
    assert [d.action.value for d in made] == ["grow"]
    assert made[0].before.version == 1 and made[0].after.version == 2
    memory_pct = made[0].inputs["memory_pct"]
    assert isinstance(memory_pct, float) and memory_pct < 60
    notes = [pubsub.get_message(timeout=2.0) for _ in range(2)]
    pubsub.close()
    assert [n["data"] for n in notes if n] == [WORKER.encode(), WORKER.encode()]
    line = next(r.getMessage() for r in caplog.records if "batch 8->" in r.getMessage())
    assert line.startswith(f"worker {WORKER} v2: batch 8->") and "memory" in line

    assert writer.flush(timeout=5.0)
    rows = records.fetch("decisions", worker_id=WORKER)
    assert len(rows) == 1
    assert rows[0]["action"] == "grow"
    assert rows[0]["batch_size_before"] == 8
    assert rows[0]["batch_size_after"] == current.batch_size
    assert rows[0]["version_after"] == 2


def test_oom_and_neighbour_shrink(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    announce(redis_client, keys)
    store = ControlStore(redis_client, keys)
    store.write(WORKER, store.read(WORKER) or AgentSettings().default_settings())
    start = store.read(WORKER)
    assert start is not None and start.version == 1
    service = AgentService(settings_for(key_prefix, redis_url), redis_client)

    oom = OomEvent(
        worker_id=WORKER, batch_size=8, max_prompt_len=200, max_new_tokens=100,
        precision="bf16", settings_version=1, recovered=True, action="split",
    )  # fmt: skip
    publish_event(redis_client, keys, oom, maxlen=1000)
    made = service.step(block_ms=200)
    assert [d.action.value for d in made] == ["halve"]
    after_oom = store.read(WORKER)
    assert after_oom is not None and (after_oom.version, after_oom.batch_size) == (2, 4)

    # Steady state on a roomy GPU, then a neighbour takes 77 of the 80 GiB, leaving less
    # than this worker's peak: it shrinks at once, no new cycle needed.
    send_telemetry(redis_client, keys, telemetry(used=4 * GIB, worker_bytes=4 * GIB))
    publish_event(redis_client, keys, cycle(4, version=2, peak=3 * GIB), maxlen=1000)
    service.step(block_ms=200)
    send_telemetry(redis_client, keys, telemetry(80 * GIB, 3 * GIB, other_bytes=77 * GIB))
    made = service.step(block_ms=200)
    assert [d.action.value for d in made] == ["shrink"]
    assert "other processes" in made[0].reason
    final = store.read(WORKER)
    assert final is not None and final.version == 3 and final.batch_size < 4


def test_bad_entries_are_skipped(
    redis_client: redis.Redis,
    keys: Keys,
    key_prefix: str,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = AgentService(settings_for(key_prefix, redis_url), redis_client)
    redis_client.xadd(keys.events_stream, {"kind": "cycle", "data": "{not json"})
    redis_client.xadd(keys.events_stream, {"kind": "mystery", "data": "{}"})
    redis_client.xadd(keys.telemetry_stream, {"data": '{"gpu": "warp"}'})
    with caplog.at_level(logging.WARNING, logger="services.agent.service"):
        assert service.step(block_ms=200) == []
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 3
    publish_event(redis_client, keys, cycle(8, version=1), maxlen=1000)
    service.step(block_ms=200)
    assert WORKER in service.workers  # still reading after the bad entries


def test_old_events_are_not_replayed_and_run_stops(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    old = OomEvent(
        worker_id=WORKER, batch_size=8, max_prompt_len=200, max_new_tokens=100,
        precision="bf16", settings_version=1, recovered=True, action="split",
    )  # fmt: skip
    publish_event(redis_client, keys, old, maxlen=1000)
    settings = settings_for(key_prefix, redis_url).model_copy(update={"agent_poll_ms": 50})
    service = AgentService(settings, redis_client)
    thread = threading.Thread(target=service.run)
    thread.start()
    time.sleep(0.3)
    service.stop()
    thread.join(timeout=3.0)
    assert not thread.is_alive()
    assert service.workers == {}  # the OOM from before the agent started is history
    assert ControlStore(redis_client, keys).read(WORKER) is None


def test_a_second_aegis_worker_on_the_gpu_is_seen_as_a_peer(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    """Both workers announce the same host; the GPU lists both pids and a third process:
    each worker's view counts the other as a peer, the third as a plain other process."""
    for worker_id, pid in (("w1", PID), ("w2", PID + 7)):
        info = WorkerInfo(worker_id=worker_id, host="gpu-host", pid=pid, device="cuda:0",
                          gpu_index=0, model="synthetic:tiny", synthetic=True)  # fmt: skip
        redis_client.hset(keys.workers, worker_id, dump(info))
    service = AgentService(settings_for(key_prefix, redis_url), redis_client)
    procs = {PID: 30 * GIB, PID + 7: 20 * GIB, PID + 9: 5 * GIB}
    gpu = GpuSample(index=0, name="H200", memory_used_bytes=55 * GIB,
                    memory_total_bytes=140 * GIB, process_memory_bytes=procs)  # fmt: skip
    send_telemetry(redis_client, keys, TelemetrySample(host="gpu-host", gpu="nvml", gpus=[gpu]))
    for worker_id in ("w1", "w2"):
        event = cycle(8, version=1).model_copy(update={"worker_id": worker_id})
        publish_event(redis_client, keys, event, maxlen=1000)
    service.step(block_ms=200)
    first, second = (service.memory_of(service.workers[w]) for w in ("w1", "w2"))
    assert first is not None and second is not None
    assert (first.other_bytes, first.peer_workers, first.peer_bytes) == (25 * GIB, 1, 20 * GIB)
    assert (second.other_bytes, second.peer_workers, second.peer_bytes) == (35 * GIB, 1, 30 * GIB)


def test_a_worker_that_sees_only_its_own_gpu_is_matched_by_uuid(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    """In a container with one GPU (or under CUDA_VISIBLE_DEVICES) every worker calls its
    GPU cuda:0; the monitor lists the host's GPUs by their own index. Each worker's view is
    its own GPU's, found by UUID (torch gives it without NVML's ``GPU-`` prefix); a UUID
    the monitor does not list is no GPU of this host, not GPU 0."""
    uuids = {"w1": "8f3e0000-aaaa", "w2": "8f3e0001-bbbb", "w3": "0000dead-cccc"}
    for worker_id, uuid in uuids.items():
        info = WorkerInfo(worker_id=worker_id, host="gpu-host", pid=PID, device="cuda:0",
                          gpu_index=0, gpu_uuid=gpu_uuid_key(uuid), model="synthetic:tiny",
                          synthetic=True)  # fmt: skip
        redis_client.hset(keys.workers, worker_id, dump(info))
    service = AgentService(settings_for(key_prefix, redis_url), redis_client)
    readings = ((10, "GPU-8f3e0000-AAAA"), (70, "GPU-8f3e0001-bbbb"))  # NVML's spelling
    gpus = [
        GpuSample(
            index=i,
            name="H200",
            memory_used_bytes=used * GIB,
            memory_total_bytes=140 * GIB,
            uuid=gpu_uuid_key(uuid),
        )
        for i, (used, uuid) in enumerate(readings)
    ]
    send_telemetry(redis_client, keys, TelemetrySample(host="gpu-host", gpu="nvml", gpus=gpus))
    for worker_id in uuids:
        event = cycle(8, version=1).model_copy(update={"worker_id": worker_id})
        publish_event(redis_client, keys, event, maxlen=1000)
    service.step(block_ms=200)
    views = {w: service.memory_of(service.workers[w]) for w in uuids}
    assert views["w1"] is not None and views["w1"].used_bytes == 10 * GIB
    assert views["w2"] is not None and views["w2"].used_bytes == 70 * GIB
    assert views["w3"] is None  # its cycles carry no NVML reading of their own either


def test_workers_in_containers_on_one_gpu_are_peers_by_uuid_while_alive(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    """Worker containers sharing a GPU: NVML lists none of their pids (their own pid
    namespaces). Each live worker on the same GPU (UUID) is still a peer, holding what
    its last cycle read plus the CUDA context; one whose heartbeat is gone is not (its
    memory went with it)."""
    uuid = gpu_uuid_key("GPU-8f3e0000-aaaa")
    reserved = {"w1": 60 * GIB, "w2": 20 * GIB, "w3": 30 * GIB}
    for n, worker_id in enumerate(reserved):
        info = WorkerInfo(worker_id=worker_id, host="gpu-host", pid=1 + n, device="cuda:0",
                          gpu_index=0, gpu_uuid=uuid, model="synthetic:tiny",
                          synthetic=True)  # fmt: skip
        redis_client.hset(keys.workers, worker_id, dump(info))
        if worker_id != "w3":  # w3 died
            redis_client.set(keys.worker_alive(worker_id), "1", ex=60)
    settings = settings_for(key_prefix, redis_url)
    service = AgentService(settings, redis_client)
    gpu = GpuSample(index=0, name="H200", memory_used_bytes=82 * GIB,
                    memory_total_bytes=140 * GIB, uuid=uuid,
                    process_memory_bytes={4242: 81 * GIB})  # fmt: skip
    send_telemetry(redis_client, keys, TelemetrySample(host="gpu-host", gpu="nvml", gpus=[gpu]))
    for worker_id, held in reserved.items():
        event = cycle(8, version=1).model_copy(
            update={"worker_id": worker_id, "gpu_uuid": uuid, "memory_reserved_bytes": held}
        )
        publish_event(redis_client, keys, event, maxlen=1000)
    service.step(block_ms=200)
    first, second = (service.memory_of(service.workers[w]) for w in ("w1", "w2"))
    overhead = settings.overhead_bytes
    assert first is not None and (first.peer_workers, first.peer_bytes) == (1, 20 * GIB + overhead)
    assert second is not None and (second.peer_workers, second.peer_bytes) == (
        1, 60 * GIB + overhead,
    )  # fmt: skip
