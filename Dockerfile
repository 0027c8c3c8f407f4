# One image for every AEGIS service; docker-compose.yml picks the command.
FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
# torch from PyPI carries its CUDA runtime; the host needs only the NVIDIA driver.
RUN pip install "torch>=2.11"
COPY pyproject.toml README.md aegis_cli.py ./
COPY shared ./shared
COPY services ./services
COPY experiments ./experiments
RUN pip install .
