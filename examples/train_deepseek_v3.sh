#!/usr/bin/env bash
# DeepSeek-V3 (671B, 37B active per token) on 256 nodes x 8 GPUs = 2048 GPUs, in the layout
# DeepSeek published: pipeline 16, expert parallel 64 over 8 nodes, ZeRO-1 data parallel over
# the rest (dp 128), no tensor parallel. Run it on every node (NODE_RANK 0..255),
# or through examples/slurm/train.sbatch. See examples/lib/launch.sh for the environment.
: "${NNODES:=256}"
source "$(dirname "$0")/lib/launch.sh"

# The shared experts and the gradient reduction run on other streams than the compute: a single
# hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=1, what TP overlap wants) would serialise them.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}

# DeepSeek ran DualPipe with one layer on the first virtual stage, 30 stages of two and the MTP
# layer with the head alone on the last; megamoe's --pipeline-schedule dualpipev needs a layer on
# every stage (61 layers do not split so), so this is 1F1B over 16 stages of 3 + 14 x 4 + 2.
LAYOUT=(
    --pipeline-model-parallel-size 16
    --decoder-first-pipeline-num-layers 3   # the embedding's stage
    --decoder-last-pipeline-num-layers 2    # the stage that also runs the MTP layer and the head
    --expert-model-parallel-size 64         # 4 routed experts per GPU: the all-to-all spans 8 nodes
)
# Full recompute: under 1F1B the first stage holds 16 micro-batches in flight, and without it
# the planner puts stage 1 at 174 GiB per GPU (MoE-layer recompute: the first stage, with the
# three dense layers, at 98 GiB); with it every stage stays under 30 GiB of an 80 GiB GPU
# (MEGAMOE_DRY_RUN=check bash examples/train_deepseek_v3.sh prints the plan).
TRAINING=(
    --train-iters 100000 --lr-warmup-iters 2000
    --moe-shared-expert-overlap             # the shared expert runs while the tokens travel
    --recompute-granularity full
)
megamoe_launch --config "$MEGAMOE_ROOT/examples/configs/deepseek_v3.yaml" "${LAYOUT[@]}" "${TRAINING[@]}"
