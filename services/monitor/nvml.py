"""Telemetry readings: every GPU through NVML, or the host alone when there is no GPU.

Contract of :class:`TelemetryReader`:

- :meth:`TelemetryReader.read` never raises because of NVML. Each field is read on its
  own: a field the GPU does not support (``NVMLError_NotSupported``) or that fails with
  any other ``NVMLError`` is ``None`` in the sample (the failure is logged once, not
  every second). A GPU that falls off the bus (``NVMLError_GpuIsLost``) is logged,
  marked lost, left out of later samples and named in the sample's ``note``.
- Without the NVML library, without a loaded driver, or with no GPU at all, samples
  have ``gpu='none'`` and only the host numbers (memory, CPU %) from psutil.
- Memory used per GPU is NVML's, so it includes every process on the GPU; the memory
  of each compute process is given by pid where NVML can tell.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
import pynvml

from shared.replies import as_text
from shared.schemas import GpuSample, TelemetrySample, gpu_uuid_key

log = logging.getLogger(__name__)

T = TypeVar("T")
MW_PER_W = 1000.0


class GpuLost(Exception):
    """A GPU stopped answering NVML (fell off the bus); it is not read again."""


class TelemetryReader:
    """Reads one :class:`TelemetrySample` per call; call :meth:`close` when done."""

    def __init__(self, host: str = "") -> None:
        self.host = host or socket.gethostname()
        self.handles: dict[int, Any] = {}
        self.lost: set[int] = set()
        self.unavailable: str | None = None
        self._warned: set[tuple[int, str, str]] = set()
        self._start_nvml()
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point

    @property
    def has_gpu(self) -> bool:
        """Whether NVML answered and found at least one GPU."""
        return self.unavailable is None

    def _start_nvml(self) -> None:
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            # LibraryNotFound / DriverNotLoaded on machines without a GPU: host only.
            self.unavailable = f"NVML unavailable: {exc}"
            log.info("no GPU telemetry (%s); reporting host memory and CPU only", exc)
            return
        for index in range(count):
            try:
                self.handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                log.warning("GPU %d: no NVML handle (%s); skipping it", index, exc)
        if not self.handles:
            self.unavailable = "no GPU found by NVML"
            log.info("NVML found no usable GPU; reporting host memory and CPU only")

    def close(self) -> None:
        """Release NVML (no-op when it never started)."""
        if self.unavailable is None:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def read(self) -> TelemetrySample:
        """One sample of every GPU still answering, plus the host."""
        memory = psutil.virtual_memory()
        sample = TelemetrySample(
            host=self.host,
            gpu="none" if self.unavailable else "nvml",
            host_memory_used_bytes=int(memory.total - memory.available),
            host_memory_total_bytes=int(memory.total),
            cpu_pct=float(psutil.cpu_percent(interval=None)),
        )
        notes = [self.unavailable] if self.unavailable else []
        for index, handle in self.handles.items():
            if index in self.lost:
                continue
            gpu, note = self._read_gpu(index, handle)
            if gpu is not None:
                sample.gpus.append(gpu)
            if note:
                notes.append(note)
        notes.extend(f"gpu {index} lost" for index in sorted(self.lost))
        sample.note = "; ".join(notes) or None
        return sample

    def _read_gpu(self, index: int, handle: Any) -> tuple[GpuSample | None, str | None]:
        """A GPU's sample, or ``None`` with the reason when its memory can't be read."""
        try:
            info = self._field(index, "memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
            if info is None:
                return None, f"gpu {index}: memory not readable"
            return self._gpu_sample(index, handle, int(info.used), int(info.total)), None
        except GpuLost:
            return None, None

    def _gpu_sample(self, index: int, handle: Any, used: int, total: int) -> GpuSample:
        name = self._field(index, "name", pynvml.nvmlDeviceGetName, handle)
        rates = self._field(index, "utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        temp = self._field(
            index, "temperature", pynvml.nvmlDeviceGetTemperature, handle,
            pynvml.NVML_TEMPERATURE_GPU,
        )  # fmt: skip
        power_mw = self._field(index, "power", pynvml.nvmlDeviceGetPowerUsage, handle)
        uuid = self._field(index, "uuid", pynvml.nvmlDeviceGetUUID, handle)
        return GpuSample(
            index=index,
            uuid=gpu_uuid_key(as_text(uuid)) if uuid is not None else None,
            name=as_text(name) if name is not None else f"gpu{index}",
            memory_used_bytes=used,
            memory_total_bytes=total,
            utilization_pct=float(rates.gpu) if rates is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power_mw / MW_PER_W if power_mw is not None else None,
            process_memory_bytes=self._processes(index, handle),
        )

    def _processes(self, index: int, handle: Any) -> dict[int, int]:
        """Memory of each compute process by pid; pids NVML can't measure are left out."""
        procs = self._field(index, "processes", pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
        by_pid: dict[int, int] = {}
        for proc in procs or []:
            used = getattr(proc, "usedGpuMemory", None)
            # NVML reports "not available" (e.g. without permission) as None or a huge value.
            if isinstance(used, int) and 0 <= used < 1 << 60:
                by_pid[int(proc.pid)] = by_pid.get(int(proc.pid), 0) + used
        return by_pid

    def _field(self, index: int, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or ``None`` when NVML can't give this field; GPU loss raises."""
        try:
            return fn(*args)
        except pynvml.NVMLError_NotSupported:
            return None
        except pynvml.NVMLError_GpuIsLost:
            self.lost.add(index)
            log.error("GPU %d is lost (fell off the bus); no longer reading it", index)
            raise GpuLost(index) from None
        except pynvml.NVMLError as exc:
            self._warn_once(index, name, exc)
            return None

    def _warn_once(self, index: int, name: str, exc: Exception) -> None:
        key = (index, name, type(exc).__name__)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("GPU %d: cannot read %s (%s); reporting it as unknown", index, name, exc)
