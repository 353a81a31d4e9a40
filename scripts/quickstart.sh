#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
if alignkit demo --help >/dev/null 2>&1; then
  exec alignkit demo "$@"
fi
# no demo in this build: the first two stages of the classical pipeline on bundled data
alignkit sft --data builtin:demo_sft --output runs/quickstart/sft --overwrite --lora --max-steps 30 \
  data.max_length=128 data.eval_fraction=0.1 optim.lr=2e-4 train.batch_size=8
alignkit rm --data builtin:demo_prefs --output runs/quickstart/rm --overwrite --lora --max-steps 30 \
  data.max_length=128 data.eval_fraction=0.15 optim.lr=5e-4 train.batch_size=8
echo "reports: runs/quickstart/sft/report.html runs/quickstart/rm/report.html"
