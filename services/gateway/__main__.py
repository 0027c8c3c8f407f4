"""Run the gateway: ``python -m services.gateway`` (settings from ``AEGIS_*``).

One process by default; with ``AEGIS_GATEWAY_PROCESSES`` above 1 this process is the
supervisor of that many server processes on the same port (``processes.py``), which
it starts as ``python -m services.gateway --child I --parent PID``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import socket

import uvicorn

from services.gateway.config import GatewaySettings
from services.gateway.draining import DrainingServer
from services.gateway.processes import (
    STARTUP_FAILURE,
    Supervisor,
    shared_port_socket,
    watch_parent,
)
from shared.logs import setup_logging

log = logging.getLogger("services.gateway")


# Cyclic GC thresholds of a server process: a young collection every 10,000 container
# allocations instead of 700 (see settle_heap).
GC_THRESHOLDS = (10_000, 50, 100)
# What uvicorn's "auto" loop and HTTP parser use when installed, and what it falls back to.
FAST_PATHS = {"uvloop": "asyncio event loop", "httptools": "h11 HTTP parser"}


def settle_heap() -> None:
    """Keep the cyclic garbage collector off what lives as long as the process.

    Profiled in a burst of 512 requests, a third of the gateway's CPU went to the
    collector: a young collection every 700 allocations and, every hundred or so of
    those, a full one walking the ~130,000 objects of FastAPI, pydantic and the app
    (some 80 ms each), while a request leaves no cyclic garbage behind. Once the server
    has started, those objects are frozen out of all collections (``gc.freeze``) and
    young collections run every 10,000 allocations: the collector's share fell to about
    5 %, the CPU per request by a quarter in a burst and a tenth under a steady load.
    Cycles are still collected, a little later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("%d objects frozen out of garbage collection", gc.get_freeze_count())


def report_speedups() -> None:
    """Say which event loop and HTTP parser uvicorn picks ("auto": uvloop and httptools
    when installed, ``uvicorn[standard]``). Without them it runs asyncio's own loop and
    h11, a parser in pure Python: a burst of 1,024 small completions went from 1,590 to
    1,330 requests a second per process on the load test's 2-core machine."""
    missing = [name for name in FAST_PATHS if importlib.util.find_spec(name) is None]
    if missing:
        log.warning("%s not installed: serving on the slower %s (pip install "
                    "'uvicorn[standard]')", " and ".join(missing),
                    " and ".join(FAST_PATHS[name] for name in missing))  # fmt: skip
    else:
        log.info("serving on uvloop with httptools")


def serve(settings: GatewaySettings, sockets: list[socket.socket] | None = None) -> None:
    """One server process: the app behind a DrainingServer (on ``sockets`` if given)."""
    # Imported here: a supervisor never builds an app.
    from services.gateway.app import create_app

    report_speedups()

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # keep the one logging setup
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s + 0.999),
    )
    DrainingServer(config, app.state.shutdown, started=settle_heap).run(sockets=sockets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The AEGIS gateway (settings: AEGIS_*).")
    # Set by the supervisor for its server processes only.
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    if args.child is not None and args.parent is not None:
        setup_logging(settings.log_level, settings.log_json, service=f"gateway-{args.child}")
        watch_parent(args.parent)
        try:
            sock = shared_port_socket(settings.gateway_host, settings.gateway_port)
        except OSError as exc:
            log.error("cannot serve on %s:%d: %s", settings.gateway_host, settings.gateway_port,
                      exc)  # fmt: skip
            raise SystemExit(STARTUP_FAILURE) from exc
        serve(settings, [sock])
        return
    setup_logging(settings.log_level, settings.log_json, service="gateway")
    count = settings.resolved_gateway_processes()
    if count == 1:
        serve(settings)
        return
    raise SystemExit(Supervisor(settings, count).run())


if __name__ == "__main__":
    main()
