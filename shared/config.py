"""Settings shared by every service, read from ``AEGIS_*`` environment variables.

Each service extends :class:`CommonSettings` with its own class (in its package's
``config.py``). Defaults make the run command work with nothing set; bad values fail
fast at start-up with pydantic's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where TinyLlama can't be had (no model hub, not in the local cache), the worker serves
# the packaged real model ``smollm2-135m`` instead, and a synthetic one only as a last resort
# (services/worker/model.py).
DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class CommonSettings(BaseSettings):
    """What every AEGIS process needs: where Redis and the database are, and logging."""

    model_config = SettingsConfigDict(env_prefix="AEGIS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis key starts with this; two deployments (or test runs) can share a server.
    key_prefix: str = Field(default="aegis", pattern=r"^[A-Za-z0-9_.-]+$")
    data_dir: Path = Path("data")
    # Empty means SQLite at <data_dir>/aegis.db; postgresql://... selects Postgres.
    database_url: str = ""
    log_level: LogLevel = "INFO"
    log_json: bool = False
    # Rows older than this are pruned from the records (0 keeps everything).
    retention_hours: float = Field(default=72.0, ge=0)
    # Converted model checkpoints (the packaged smollm2-135m); unset: <data_dir>/models.
    model_cache_dir: Path | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def resolved_database_url(self) -> str:
        """The database URL in force: the configured one, or the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'aegis.db').resolve()}"

    def resolved_model_cache_dir(self) -> Path:
        """Where converted model checkpoints are kept."""
        return self.model_cache_dir or self.data_dir / "models"
