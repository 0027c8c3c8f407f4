"""The ``aegis`` command: run the whole system locally, or one service, or a benchmark."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from services.launcher import main as launcher_main

    return launcher_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
