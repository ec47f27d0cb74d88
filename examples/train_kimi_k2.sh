#!/usr/bin/env bash
# Kimi K2 (1.04T, 32B active) on 256 nodes x 8 GPUs = 2048 GPUs, near the layout Moonshot
# published (pipeline 16 with virtual stages, expert parallel 16, ZeRO-1 data parallel): here
# pipeline 16 without virtual stages (see below), expert parallel 16, dp 128 / expert-dp 8. See examples/lib/launch.sh for the environment.
: "${NNODES:=256}"
source "$(dirname "$0")/lib/launch.sh"

# side streams (gradient reduction) need more than one hardware queue (see train_deepseek_v3.sh)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}

LAYOUT=(
    --pipeline-model-parallel-size 16
    --decoder-first-pipeline-num-layers 3     # 61 = 3 + 14 x 4 + 2; virtual stages would need every
    --decoder-last-pipeline-num-layers 2      # stage's count even, which 61 layers cannot give
    --expert-model-parallel-size 16           # 24 of the 384 experts per GPU, EP inside two nodes
)
# Full recompute: without it the planner puts stage 1 (15 micro-batches in flight) at 173 GiB per
# GPU, with MoE-layer recompute at 81 GiB; with full recompute every stage stays under 40 GiB.
TRAINING=(
    --train-iters 100000
    --recompute-granularity full
)
# MuonClip, as Kimi K2 was trained: Muon with Moonlight's update scaling (0.2: the update's RMS
# matches AdamW's, so the config's learning rate 2e-4 and weight decay 0.1 are K2's), and qk-clip
# at K2's threshold 100. With the distributed optimizer each matrix is orthogonalised by one of
# its data-parallel ranks (dp 128 for attention, expert-dp 8 for experts).
OPTIMIZER=(
    --optimizer muon
    --muon-extra-scale-factor 0.2
    --qk-clip
    --qk-clip-threshold 100
)
megamoe_launch --config "$MEGAMOE_ROOT/examples/configs/kimi_k2.yaml" "${LAYOUT[@]}" "${TRAINING[@]}" \
    "${OPTIMIZER[@]}"
