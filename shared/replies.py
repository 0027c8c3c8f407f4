"""Decoding redis-py replies (bytes unless the client decodes responses)."""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    """A reply field as ``str``: bytes decoded as UTF-8 (bad bytes replaced), else ``str()``."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
