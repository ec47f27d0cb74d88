#!/usr/bin/env bash
# Everything the GPU machine is for, in one call: the GPU test tier, then the training
# benchmark. Logs go to $OUT (device tool) or ./gpu_logs. Usage:
#   bash tools/gpu_check.sh [tests] [bench BACKEND...]
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"; mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
mode="${1:-all}"; shift || true
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -15
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  python3 tools/bench_train.py --backends "${@:-torch}" 2>&1 | tee "$LOG/bench_train.log" | tail -30
fi
