#!/usr/bin/env bash
# DeepSeek-V2-Lite (15.7B, 2.4B active) on one node of 8 GPUs: expert parallel 8 (8 of the 64
# experts per GPU), ZeRO-1 data parallel 8, no TP or PP: the model fits, and every collective
# stays on NVLink. Add nodes with NNODES (data parallel grows). See examples/lib/launch.sh.
: "${NNODES:=1}"
source "$(dirname "$0")/lib/launch.sh"

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}   # shared-expert overlap on a side stream

LAYOUT=(
    --expert-model-parallel-size 8
)
TRAINING=(
    --train-iters 50000
    --moe-shared-expert-overlap              # the 2 shared experts run while tokens travel
)
megamoe_launch --config "$MEGAMOE_ROOT/examples/configs/deepseek_v2_lite.yaml" "${LAYOUT[@]}" "${TRAINING[@]}"
