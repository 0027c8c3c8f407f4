"""Settings of the dashboard, read from ``AEGIS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field

from shared.config import CommonSettings


class DashboardSettings(CommonSettings):
    """Where the dashboard listens, how often it refreshes, its default window, what it reads."""

    # Where `python -m services.dashboard` makes Streamlit listen.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8501, ge=1, le=65535)
    refresh_s: float = Field(default=2.0, gt=0)
    window_minutes: float = Field(default=15.0, gt=0)
    # Rows fetched per table and refresh: keeps a 24 h window cheap to draw.
    max_rows: int = Field(default=20_000, ge=100)
    # Dead letters are read from Redis (the database doesn't hold them): a short timeout
    # keeps a Redis outage from stalling the page; at most this many are listed.
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10)
    dead_letter_rows: int = Field(default=100, ge=1, le=1000)
    # The agent's time-to-first-token target (the same AEGIS_TTFT_TARGET_MS): drawn as a
    # line on the TTFT chart when set.
    ttft_target_ms: float | None = Field(default=None, gt=0)
