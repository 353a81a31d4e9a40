#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the browser tests drive the system Chromium (Debian packages), installed only when missing
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver
fi
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
# Second pass (the whole suite only, on x86-64): the tests marked `hw` (their behaviour depends on the
# CPU class: bf16 autocast, packed bf16 linears, the bf16 decode copy, lean decode steps) again as an
# AVX2-only CPU, so a green run on an AVX512/AMX machine means a green run on an AVX2 laptop.
# ALIGNKIT_EXPECT_CPU_ISA makes tests/test_hardware.py fail if the emulation stops working (docs/hardware.md).
if [ $# -eq 0 ] && [ "$(uname -m)" = "x86_64" ] && [ "${ALIGNKIT_NO_AVX2_PASS:-0}" != "1" ]; then
  echo "== again as an AVX2-only CPU (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), tests marked hw"
  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ALIGNKIT_EXPECT_CPU_ISA=avx2 \
    python -m pytest -q -p no:cacheprovider -m hw
fi
