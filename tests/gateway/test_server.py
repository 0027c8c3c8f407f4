"""The server process around the app: the started hook and the garbage collector's setup."""

from __future__ import annotations

import gc
import socket
import threading
import weakref

import uvicorn

from services.gateway.__main__ import GC_THRESHOLDS, settle_heap
from services.gateway.draining import DrainingServer, Shutdown
from tests.processes import free_port, wait_for


class _Node:
    self: object


async def _app(scope: dict, receive: object, send: object) -> None:
    assert scope["type"] == "lifespan"  # no request is sent


def test_the_started_hook_runs_once_the_server_listens() -> None:
    port = free_port()
    listening: list[bool] = []

    def started() -> None:
        with socket.socket() as probe:
            listening.append(probe.connect_ex(("127.0.0.1", port)) == 0)

    config = uvicorn.Config(_app, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    server = DrainingServer(config, Shutdown(drain_s=0.1), started=started)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: bool(listening), 10, "the started hook")
    finally:
        server.should_exit = True
        thread.join(10)
    assert listening == [True]


def test_settle_heap_freezes_the_long_lived_objects_and_collects_less_often() -> None:
    thresholds = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == GC_THRESHOLDS
        # Cycles made later are still collected.
        node = _Node()
        node.self = node
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
