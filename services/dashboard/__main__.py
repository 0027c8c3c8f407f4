"""``python -m services.dashboard``: serve the dashboard with Streamlit on the settings' port.

Equivalent to ``streamlit run services/dashboard/app.py --server.port 8501 ...``; the
process is replaced by Streamlit (exec), so signals reach it directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.dashboard.config import DashboardSettings

APP = Path(__file__).with_name("app.py")


def command(settings: DashboardSettings) -> list[str]:
    """The ``streamlit run`` command line for ``settings``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        settings.dashboard_host,
        "--server.port",
        str(settings.dashboard_port),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]


def main() -> None:
    """Replace this process by Streamlit serving the dashboard."""
    argv = command(DashboardSettings())
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
