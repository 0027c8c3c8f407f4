"""Settings of a worker process (``AEGIS_*`` environment variables)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, model_validator

from shared.config import DEFAULT_MODEL, CommonSettings

DeviceChoice = Literal["auto", "cpu", "cuda"] | str
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16", "int8"]
DEFAULT_METRICS_PORT = 9400
# How far above the default an unset metrics port may move (one port per worker on a host).
METRICS_PORT_RANGE = 100


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as Prometheus' server binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # create_server sets SO_REUSEADDR, as http.server does: only a listener conflicts.
        socket.create_server((host, port), family=family).close()
    except OSError:
        return False
    return True


def first_free_port(host: str, start: int) -> int:
    """The first port from ``start`` on which a server could listen."""
    for port in range(start, start + METRICS_PORT_RANGE):
        if port_is_free(host, port):
            return port
    raise ValueError(
        f"no free metrics port in {start}-{start + METRICS_PORT_RANGE - 1} on {host}: "
        "set AEGIS_WORKER_METRICS_PORT (0 for no metrics)"
    )


class WorkerSettings(CommonSettings):
    """One worker serves one model on one device and is one consumer of the stream."""

    worker_id: str = ""
    model: str = DEFAULT_MODEL
    allow_synthetic_fallback: bool = True
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: PrecisionChoice = "auto"
    # Initial settings until the agent writes some. batch_size: max concurrent sequences.
    batch_size: int = Field(default=256, ge=1, le=4096)
    max_seq_len: int = Field(default=0, ge=0)  # 0: the model's context length
    # Tokens one engine step computes at most (prompt chunks + decodes).
    max_batched_tokens: int = Field(default=8192, ge=16)
    # Bytes of the paged KV pool (0: what the device can spare, see gpu_memory_fraction).
    kv_budget_bytes: int = Field(default=0, ge=0)
    block_size: int = Field(default=16, ge=1, le=1024)
    cuda_graphs: bool = True
    # Decode steps run back to back on the device while every sequence decodes and no
    # waiting request could join (host work once per this many tokens).
    decode_steps: int = Field(default=8, ge=1, le=64)
    # A request that does not fit the current max_seq_len waits this long, then errors.
    admission_timeout_s: float = Field(default=120.0, gt=0)
    # On stop, how long running requests may take to finish before being handed back.
    drain_timeout_s: float = Field(default=20.0, ge=0)
    # Step statistics are summed into one cycle record per interval.
    record_interval_s: float = Field(default=1.0, gt=0)
    settings_poll_s: float = Field(default=0.05, ge=0)
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    claim_refresh_s: float = Field(default=5.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    heartbeat_ttl_s: int = Field(default=15, ge=2)
    poll_block_ms: int = Field(default=500, ge=1)
    events_maxlen: int = Field(default=10_000, ge=100)
    # Prometheus /metrics of this worker (0: not served). One port per worker on a host:
    # unset, the first free port from 9400 up; set, that port or a clear error if it is taken.
    worker_metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # The share of the GPU this process may use (weights + activations + KV pool).
    gpu_memory_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    # Testing hook: an injected OOM for steps over this many tokens (0 = off), to
    # exercise the recovery on a CPU.
    inject_oom_above_tokens: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _default_worker_id(self) -> WorkerSettings:
        self._settle_metrics_port()
        if not self.worker_id:
            # Unique on a host without configuration: two workers never share a metrics
            # port, so the port tells them apart (and stays the same across a restart).
            device = self.device.replace(":", "")
            suffix = self.worker_metrics_port or f"pid{os.getpid()}"
            self.worker_id = f"{socket.gethostname()}-{device}-{suffix}"
        return self

    def _settle_metrics_port(self) -> None:
        host, port = self.worker_metrics_host, self.worker_metrics_port
        if "worker_metrics_port" not in self.model_fields_set:
            self.worker_metrics_port = first_free_port(host, DEFAULT_METRICS_PORT)
        elif port and not port_is_free(host, port):
            raise ValueError(
                f"AEGIS_WORKER_METRICS_PORT={port} is already in use on {host} (another "
                "worker on this host?): give each worker its own port, leave it unset to "
                f"take the first free one from {DEFAULT_METRICS_PORT}, or set 0 for no metrics"
            )

    @property
    def consumer_name(self) -> str:
        """Stream consumer: unique per process, so a restart never inherits stale claims."""
        return f"{self.worker_id}:{os.getpid()}"
