#!/usr/bin/env bash
# Create .venv beside this file and install the suite's requirements into it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first, so that requirements.txt's `torch>=2.1` is already met: install your own build beforehand (e.g. a
# CUDA one) and it is kept. Otherwise TORCH_SPEC is installed: torch 2.13.0, which is the CPU build on the CI machines.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/python -c "import torch, diffusers, transformers, accelerate; print(f'ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
