# Sourced by examples/train_*.sh: the environment a multi-node MoE job needs, the data and
# checkpoint flags from the environment, and one torchrun launch per node.
#
# Environment (Megatron-LM's names where it has them):
#   GPUS_PER_NODE (8)  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (localhost)  MASTER_PORT (6000)
#   RUN_ID             rendezvous id, the same on every node of one job (default: megamoe-$MASTER_PORT)
#   DATA_PATH          an indexed dataset prefix (or a blend: "0.3 A 0.7 B"); unset: mock data
#   TOKENIZER_MODEL    the Hugging Face tokenizer.json (or its directory) the data was made with
#   CHECKPOINT_DIR     --save and --load: a job resumes from its own latest checkpoint
#   SAVE_INTERVAL (500)  TENSORBOARD_DIR  PYTHON (python)
#   MEGAMOE_DRY_RUN=1  print the torchrun command instead of running it; =check validates the
#                      layout for NNODES x GPUS_PER_NODE and prints its plan (tools/plan_layout.py:
#                      memory per GPU per stage, traffic, step time), failing when a stage's
#                      predicted peak exceeds GPU_MEMORY_GIB (80: H100 / H800; 141 for an H200)
# Extra arguments to a train_*.sh script are appended to pretrain_moe.py's flags and win.

set -euo pipefail
MEGAMOE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
RUN_ID=${RUN_ID:-megamoe-$MASTER_PORT}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=("$@")  # a sourced file sees the script's arguments

# Flags every script shares: bf16 with ZeRO-1 (--use-distributed-optimizer), the gradient
# reduction and the parameter gather overlapped with compute, the all-to-all token dispatcher,
# a log line every iteration and a validation pass every 1000.
COMMON_ARGS=(--bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
             --moe-token-dispatcher-type alltoall --log-interval 1 --eval-interval 1000 --eval-iters 10)

# The caching allocator grows segments instead of fragmenting when MoE's token counts change
# shape every step (the dispatched rows per expert differ each micro-batch).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# After SIGTERM torchrun gives its ranks this long to finish the iteration and save
# (--exit-signal-handler) before SIGKILL; its default is 30 s, short for a large checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# Each rank's CPU threads (data loading, the host side of the step); torchrun would set 1.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

megamoe_data_args() {
    if [ -n "${DATA_PATH:-}" ]; then
        if [ -z "${TOKENIZER_MODEL:-}" ]; then
            echo "$(basename "$0"): DATA_PATH is set but TOKENIZER_MODEL is not" >&2
            exit 2
        fi
        # shellcheck disable=SC2206  # a blend is several words
        DATA_ARGS=(--data-path $DATA_PATH --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
    else
        echo "$(basename "$0"): DATA_PATH is not set: training on mock data" >&2
        DATA_ARGS=(--mock-data)
    fi
}

megamoe_checkpoint_args() {
    CHECKPOINT_ARGS=()
    if [ -n "${CHECKPOINT_DIR:-}" ]; then
        # --exit-signal-handler: on SIGTERM (SLURM's preemption notice) finish the iteration,
        # save, exit 0; the next launch with the same directory resumes from it.
        CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval "${SAVE_INTERVAL:-500}"
                         --exit-signal-handler)
    fi
    if [ -n "${TENSORBOARD_DIR:-}" ]; then
        CHECKPOINT_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
    fi
}

# megamoe_launch FLAGS... : torchrun on this node (COMMON_ARGS, the script's FLAGS, the data and
# checkpoint flags, then the script's own arguments, which win); every node runs the same command and the
# c10d rendezvous at MASTER_ADDR:MASTER_PORT assigns the ranks.
megamoe_launch() {
    megamoe_data_args
    megamoe_checkpoint_args
    local flags=("${COMMON_ARGS[@]}" "$@" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${EXTRA_ARGS[@]}")
    if [ "${MEGAMOE_DRY_RUN:-}" = check ]; then  # validate and plan the layout, launch nothing
        exec "$PYTHON" "$MEGAMOE_ROOT/tools/plan_layout.py" --nnodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
            --gpu-memory-gib "${GPU_MEMORY_GIB:-80}" -- "${flags[@]}"
    fi
    local cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
               --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
               --rdzv-id "$RUN_ID" "$MEGAMOE_ROOT/pretrain_moe.py" "${flags[@]}")
    if [ -n "${MEGAMOE_DRY_RUN:-}" ]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    exec "${cmd[@]}"
}
