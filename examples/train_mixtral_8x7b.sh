#!/usr/bin/env bash
# Mixtral-8x7B (46.7B, 12.9B active) on 8 nodes x 8 GPUs = 64 GPUs: tensor parallel 2 with
# sequence parallel and expert parallel 8 inside a node, pipeline 4 across nodes, ZeRO-1 data
# parallel 8 (expert-dp 2). Eight large experts (14336 wide) make TP worth its all-reduces here, unlike the
# fine-grained DeepSeek experts. See examples/lib/launch.sh for the environment.
: "${NNODES:=8}"
source "$(dirname "$0")/lib/launch.sh"

LAYOUT=(
    --tensor-model-parallel-size 2 --sequence-parallel
    --pipeline-model-parallel-size 4          # 32 layers, 8 per stage
    --expert-model-parallel-size 8 --expert-tensor-parallel-size 1   # whole experts: EP 8 stays in a node
)
TRAINING=(
    --train-iters 50000
)
megamoe_launch --config "$MEGAMOE_ROOT/examples/configs/mixtral_8x7b.yaml" "${LAYOUT[@]}" "${TRAINING[@]}"
