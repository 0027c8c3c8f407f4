"""The device's memory as the driver sees it, and a device name's GPU index and UUID: the
parts of a cycle record that come from the device (see :mod:`services.worker.window`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from shared.schemas import gpu_uuid_key


@dataclass
class DeviceMemory:
    """What the worker knows of its GPU's memory (all None on CPU)."""

    nvml_used_bytes: int | None = None
    nvml_total_bytes: int | None = None
    utilization_pct: float | None = None


def gpu_index(device: str) -> int | None:
    """``cuda:N`` -> N, ``cuda`` -> 0, anything else -> None."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":")[1]) if ":" in device else 0


@cache  # read into every cycle record; a device's UUID never changes
def gpu_uuid(device: str) -> str | None:
    """The UUID of the GPU behind ``device`` (None on CPU), as the monitor's samples carry
    it: the index a worker sees is not the host's when it sees only its own GPU."""
    index = gpu_index(device)
    if index is None:
        return None
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return gpu_uuid_key(str(uuid)) if uuid is not None else None


def device_memory(device: str) -> DeviceMemory:
    """Used/total memory of the GPU as the driver sees it (other processes included)."""
    index = gpu_index(device)
    if index is None:
        return DeviceMemory()
    import torch

    free, total = torch.cuda.mem_get_info(index)
    try:
        utilization: float | None = float(torch.cuda.utilization(index))
    except Exception:  # NVML missing or not supported: utilisation stays unknown
        utilization = None
    return DeviceMemory(int(total - free), int(total), utilization)
