"""``python -m services.worker``: load the model and serve batches until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import sys

import redis

from services.worker.batch_core import BatchEngineCore
from services.worker.config import WorkerSettings
from services.worker.core.engine import CoreConfig, EngineCore, EngineUnsupported
from services.worker.loop import ServingCore
from services.worker.metrics import WorkerMetrics
from services.worker.model import LoadedModel, load_model, resolve_device, resolve_precision
from services.worker.oom import OomInjector
from services.worker.service import Worker
from shared.db.writer import RecordWriter
from shared.logs import setup_logging

log = logging.getLogger("services.worker")


def main() -> int:
    settings = WorkerSettings()
    setup_logging(settings.log_level, settings.log_json, f"worker[{settings.worker_id}]")
    # Served first: the port the settings picked is claimed before the (long) model load.
    metrics = WorkerMetrics(settings.worker_id)
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    device = resolve_device(settings.device)
    loaded = load_model(
        settings.model,
        device,
        resolve_precision(settings.precision, device),
        allow_synthetic_fallback=settings.allow_synthetic_fallback,
    )
    # Its decode graphs are captured in Worker.run, for the settings in force, before it
    # announces the model: a first request never waits for a capture.
    core = build_core(loaded, settings)
    client = redis.Redis.from_url(settings.redis_url)
    # Given a URL, the writer opens the database itself and retries while it is down.
    writer = RecordWriter(
        settings.resolved_database_url(),
        spill_dir=settings.data_dir / "spill" / settings.worker_id,
        retention_hours=settings.retention_hours,
    )
    worker = Worker(settings, client, writer, loaded, core, metrics)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    try:
        worker.run()
    finally:
        writer.close()
    return 0


def build_core(loaded: LoadedModel, settings: WorkerSettings) -> ServingCore:
    """The engine core on the loaded model, configured from the worker's settings; the
    batch engine for an architecture the core's runner does not cover (said loudly)."""
    config = CoreConfig(
        block_size=settings.block_size,
        max_num_seqs=settings.batch_size,
        max_batched_tokens=settings.max_batched_tokens,
        max_seq_len=settings.max_seq_len,
        kv_budget_bytes=settings.kv_budget_bytes,
        cuda_graphs=settings.cuda_graphs,
        decode_steps=settings.decode_steps,
        admission_timeout_s=settings.admission_timeout_s,
        gpu_memory_fraction=settings.gpu_memory_fraction,
    )
    fault = None
    if settings.inject_oom_above_tokens:
        fault = OomInjector(max_tokens=settings.inject_oom_above_tokens)
    try:
        return EngineCore(loaded, config, fault=fault)
    except EngineUnsupported as exc:
        log.warning("!!! the engine core does not run %s (%s): serving whole batches through "
                    "HF generate instead (slower; streamed text arrives per batch)",
                    loaded.name, exc)  # fmt: skip
        return BatchEngineCore(loaded, config, fault=fault)


if __name__ == "__main__":
    sys.exit(main())
