"""The launcher's restart policy on real child processes (tiny Python programs)."""

from __future__ import annotations

import sys
import threading
import time

from services.launcher import Child, LauncherSettings, Supervisor


def _child(code: str) -> Child:
    return Child("svc", [sys.executable, "-c", code])


def test_a_child_that_keeps_dying_at_start_is_given_up() -> None:
    child = _child("import sys; sys.exit(3)")
    supervisor = Supervisor([child], LauncherSettings(restart_limit=3, stable_after_s=30))
    started = time.monotonic()
    assert supervisor.run() == 1
    assert supervisor.failed is child and child.quick_failures == 3
    assert child.process is not None and child.process.returncode == 3
    assert time.monotonic() - started < 30  # backs off 1 s, 2 s: no endless loop


def test_a_child_that_ran_a_while_is_forgiven_and_restarted() -> None:
    child = _child("import sys, time; time.sleep(0.6); sys.exit(1)")
    supervisor = Supervisor([child], LauncherSettings(restart_limit=2, stable_after_s=0.5))
    pids: set[int] = set()

    def watch() -> None:  # stop once the child has been started three times
        deadline = time.monotonic() + 60
        while len(pids) < 3 and time.monotonic() < deadline:
            if child.process is not None:
                pids.add(child.process.pid)
            time.sleep(0.05)
        supervisor.stopping = True

    watcher = threading.Thread(target=watch)
    watcher.start()
    code = supervisor.run()
    watcher.join()
    assert len(pids) == 3 and code == 0 and supervisor.failed is None
