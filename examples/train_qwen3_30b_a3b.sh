#!/usr/bin/env bash
# Qwen3-30B-A3B (30.5B, 3.3B active) on 2 nodes x 8 GPUs = 16 GPUs: expert parallel 8 inside a
# node (16 of the 128 experts per GPU), pipeline 2 across the nodes (24 layers each), ZeRO-1
# data parallel 8. See examples/lib/launch.sh for the environment.
: "${NNODES:=2}"
source "$(dirname "$0")/lib/launch.sh"

LAYOUT=(
    --pipeline-model-parallel-size 2
    --expert-model-parallel-size 8
)
TRAINING=(
    --train-iters 50000
)
megamoe_launch --config "$MEGAMOE_ROOT/examples/configs/qwen3_30b_a3b.yaml" "${LAYOUT[@]}" "${TRAINING[@]}"
