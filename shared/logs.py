"""The one logging setup of every AEGIS process: concise console lines or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", json_output: bool = False, service: str = "") -> None:
    """Configure the root logger once; later calls replace the handler, never stack it."""
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        tag = f"{service} " if service else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname).1s {tag}%(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that narrate every request at INFO drown the one line per cycle.
    for noisy in ("httpx", "urllib3", "uvicorn.access", "rq.worker"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
