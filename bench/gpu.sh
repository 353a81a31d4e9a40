#!/usr/bin/env bash
# The GPU benchmark and GPU tests in one command (sized for well under 10 minutes on one H100/H200).
# TRL and any package the GPU image lacks travel as wheels in .whl/ (see bench/README.md), installed
# into /tmp/site so that nothing of the machine's own environment changes.
#   bash bench/gpu.sh [OUTDIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/bench-gpu}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# DPO/SFT/GRPO/generation against TRL's defaults, then SFT/DPO against TRL's fastest settings
timeout 240 python3 bench/vs_trl.py --device cuda --sizes 135m --tasks sft,dpo,grpo,generation --steps 8 \
  --grpo-steps 4 --json "$OUT/default.json" 2>&1 | tee "$OUT/bench.txt"
timeout 150 python3 bench/vs_trl.py --device cuda --sizes 1.7b --tasks sft,dpo --steps 6 --trl-fast \
  --json "$OUT/fast.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_rollout_engine.py \
  tests/test_vllm_engine.py 2>&1 | tee "$OUT/tests.txt"
