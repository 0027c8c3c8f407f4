"""The telemetry reader: host-only without a GPU, and graceful with every NVML failure.

This machine has no GPU, so the NVML error paths are driven by replacing pynvml's
functions with ones that raise the real ``NVMLError`` subclasses (the real-GPU run
happens on the device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import pynvml
import pytest

from services.monitor.nvml import TelemetryReader

GIB = 1 << 30


def test_without_gpu_reports_host_numbers() -> None:
    reader = TelemetryReader(host="test-host")
    try:
        sample = reader.read()
    finally:
        reader.close()
    assert not reader.has_gpu
    assert sample.gpu == "none"
    assert sample.gpus == []
    assert sample.host == "test-host"
    assert sample.host_memory_total_bytes == psutil.virtual_memory().total
    assert 0 < sample.host_memory_used_bytes <= sample.host_memory_total_bytes
    assert 0.0 <= sample.cpu_pct <= 100.0
    assert sample.note is not None and "NVML" in sample.note


def test_driver_not_loaded_falls_back_to_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def init() -> None:
        raise pynvml.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    sample = TelemetryReader(host="h").read()
    assert sample.gpu == "none"
    assert sample.gpus == []
    assert sample.host_memory_total_bytes > 0
    assert "Driver Not Loaded" in (sample.note or "")


@dataclass
class Memory:
    used: int
    total: int


@dataclass
class Rates:
    gpu: int
    memory: int


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


class FakeNvml:
    """Three GPUs: 0 answers partly, 1 falls off the bus, 2 has no handle."""

    def __init__(self) -> None:
        self.memory_calls = {0: 0, 1: 0}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        mp.setattr(pynvml, "nvmlInit", lambda: None)
        mp.setattr(pynvml, "nvmlShutdown", lambda: None)
        mp.setattr(pynvml, "nvmlDeviceGetCount", lambda: 3)
        mp.setattr(pynvml, "nvmlDeviceGetHandleByIndex", self.handle)
        mp.setattr(pynvml, "nvmlDeviceGetMemoryInfo", self.memory)
        mp.setattr(pynvml, "nvmlDeviceGetName", lambda h: b"Fake H100")
        mp.setattr(pynvml, "nvmlDeviceGetUtilizationRates", self.not_supported)
        mp.setattr(pynvml, "nvmlDeviceGetTemperature", self.unknown)
        mp.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: 123_456)
        mp.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", self.processes)

    @staticmethod
    def handle(index: int) -> int:
        if index == 2:
            raise pynvml.NVMLError_Unknown()
        return index

    def memory(self, handle: int) -> Memory:
        self.memory_calls[handle] += 1
        if handle == 1:
            raise pynvml.NVMLError_GpuIsLost()
        return Memory(used=30 * GIB, total=80 * GIB)

    @staticmethod
    def not_supported(*_args: object) -> None:
        raise pynvml.NVMLError_NotSupported()

    @staticmethod
    def unknown(*_args: object) -> None:
        raise pynvml.NVMLError_Unknown()

    @staticmethod
    def processes(handle: int) -> list[Proc]:
        return [Proc(101, 20 * GIB), Proc(202, None), Proc(101, GIB)]


def test_nvml_errors_are_handled_per_field(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml()
    fake.install(monkeypatch)
    reader = TelemetryReader(host="h")
    with caplog.at_level(logging.WARNING):
        first = reader.read()
        second = reader.read()
    assert reader.has_gpu and first.gpu == "nvml"
    assert [g.index for g in first.gpus] == [0]  # 1 is lost, 2 had no handle
    gpu = first.gpus[0]
    assert gpu.name == "Fake H100"
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (30 * GIB, 80 * GIB)
    assert gpu.utilization_pct is None  # NotSupported
    assert gpu.temperature_c is None  # another NVMLError
    assert gpu.power_w == pytest.approx(123.456)  # mW -> W
    assert gpu.process_memory_bytes == {101: 21 * GIB}  # unmeasurable pid left out
    assert "gpu 1 lost" in (first.note or "")
    assert "gpu 1 lost" in (second.note or "")
    assert fake.memory_calls[1] == 1  # a lost GPU is not read again
    assert len(second.gpus) == 1
    temperature_warnings = [r for r in caplog.records if "temperature" in r.getMessage()]
    assert len(temperature_warnings) == 1  # logged once, not every tick
    assert any("lost" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_memory_not_readable_leaves_gpu_out(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    fake.install(monkeypatch)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", FakeNvml.not_supported)
    sample = TelemetryReader(host="h").read()
    assert sample.gpu == "nvml"
    assert sample.gpus == []
    assert "gpu 0: memory not readable" in (sample.note or "")
