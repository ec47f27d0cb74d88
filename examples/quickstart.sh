#!/usr/bin/env bash
# The demo: train the tiny DeepSeek-V3-style model (MLA, shared + routed experts, sigmoid router
# with expert bias) on mock data, on CPU, with 4 ranks: tensor parallel 2 with sequence parallel,
# times 2 data-parallel replicas. Extra arguments go to pretrain_moe.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash tools/bootstrap_venv.sh)
RUN_DIR="${RUN_DIR:-runs/quickstart}"
export OMP_NUM_THREADS=1
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node 4 pretrain_moe.py \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --tensorboard-dir "$RUN_DIR/tensorboard" "$@"
