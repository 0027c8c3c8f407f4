# Two commands matter on a fresh machine: `make run` and `make test` (see README).
.PHONY: run test lint install clean

PY_SOURCES = shared services experiments tests scripts aegis_cli.py

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

run: install
	.venv/bin/aegis run

test: install
	.venv/bin/python -m pytest

lint: install
	.venv/bin/ruff check $(PY_SOURCES) && .venv/bin/ruff format --check $(PY_SOURCES) && .venv/bin/mypy shared services experiments aegis_cli.py

clean:
	rm -rf .venv data test-artifacts
