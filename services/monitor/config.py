"""Settings of the monitor service (``AEGIS_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from shared.config import CommonSettings


class MonitorSettings(CommonSettings):
    """How often the monitor reads the GPUs and how much history the stream keeps."""

    interval_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    # The telemetry stream is trimmed to about this many entries (XADD MAXLEN ~).
    stream_maxlen: int = Field(default=10000, ge=1)
    # Host name written in every sample; empty means this machine's name.
    host_name: str = ""
