"""Megatron-LM's own launch flags for MoE models, transcribed unchanged.

From NVIDIA/Megatron-LM at commit d98e8a64ddf34856e74b24714e3bedb2f5a39553 (2026-08-22):

- ``mixtral``: examples/mixtral/train_mixtral_8x7b_distributed.sh, every argument group of its
  ``pretrain_gpt.py`` call (the wandb group is only added when WANDB_API_KEY is set);
- ``deepseek_v2_lite``: examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh;
- ``qwen3_30b_a3b``: examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh;
- ``deepseek_v3``: examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-R1.sh (DeepSeek-V3's
  architecture).

And from NVIDIA's Megatron MoE model zoo (yanring/Megatron-MoE-ModelZoo at commit
31942f0973c9aaad44618cef0449676d4e47b5a3), the DeepSeek-V3 benchmarking run:

- ``deepseek_v3_model_zoo``: the MODEL_ARGS of model_configs/benchmarking/DeepSeek-V3.yaml, as
  its sbatch_benchmarking.sh turns them into flags (``true`` gives the bare flag, ``false`` drops
  it), plus what that script adds for ``DISPATCHER=alltoall`` (its other dispatchers are DeepEP
  and HybridEP, which megamoe does not build). The tokenizer, a Hugging Face hub name there, is a
  placeholder here (no hub is reachable); the script's variables are placeholders too.
- ``qwen3_30b_a3b_model_zoo``: the MODEL_ARGS of model_configs/benchmarking/Qwen3-30B-A3B.yaml (at
  commit 17070963cc67634f2b998ece29cad7cfe770d159) the same way, with ``MOE_GROUPED_GEMM=true``
  and ``MOE_TOKEN_DISPATCHER=alltoall``.

The modelopt confs hold a model's MODEL_ARGS; the script that sources them adds the tokenizer
path (from the Hugging Face model name), the data and the training length. Placeholders the
scripts fill from their arguments or environment are written ``{NAME}`` here. A module of its
own (not conftest.py) so that worker processes import the same file.
"""

from __future__ import annotations

MIXTRAL = """
--use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768
--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
--position-embedding-type rope --swiglu --untie-embeddings-and-output-weights
--group-query-attention --num-query-groups 8 --no-masked-softmax-fusion --no-position-embedding
--rotary-base 1000000
--num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
--moe-grouped-gemm --moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce
--tokenizer-type Llama2Tokenizer --tokenizer-model {TOKENIZER_MODEL} --data-path {DATA_PATH}
--split 99990,8,2
--micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --train-iters 500000 --lr-decay-iters 320000
--lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 500 --clip-grad 1.0 --bf16
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --expert-model-parallel-size 8
--use-distributed-optimizer --sequence-parallel
--log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10 --save {CHECKPOINT_PATH}
--load {CHECKPOINT_PATH} --tensorboard-dir {CHECKPOINT_PATH}/tensorboard --no-load-optim --no-load-rng
"""

DEEPSEEK_V2_LITE = """
--save-interval 100000 --attention-dropout 0.0 --hidden-dropout 0.0 --micro-batch-size 1 --bf16
--no-masked-softmax-fusion --disable-bias-linear --untie-embeddings-and-output-weights
--position-embedding-type rope --no-rope-fusion --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
--num-layers 27 --hidden-size 2048 --ffn-hidden-size 10944 --num-attention-heads 16 --kv-channels 16
--multi-latent-attention --kv-lora-rank 512 --v-head-dim 128 --qk-head-dim 128 --qk-layernorm
--qk-pos-emb-head-dim 64 --num-experts 64 --moe-layer-freq ([0]+[1]*26) --moe-ffn-hidden-size 1408
--moe-grouped-gemm --moe-router-score-function softmax --moe-router-topk 6
--moe-router-topk-scaling-factor 1.0 --moe-router-pre-softmax --moe-shared-expert-intermediate-size 2816
--moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall --moe-token-drop-policy probs
--moe-router-load-balancing-type seq_aux_loss --seq-length 1024 --max-position-embeddings 1024
--tokenizer-type HuggingFaceTokenizer --make-vocab-size-divisible-by 3200 --attention-softmax-in-fp32
--use-mcore-models --rotary-percent 1.0 --rotary-base 10000 --rotary-scaling-factor 40 --mscale 0.707
--mscale-all-dim 0.707 --sequence-parallel
"""

QWEN3_30B_A3B = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion --disable-bias-linear
--untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion
--normalization RMSNorm --swiglu --num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144
--num-attention-heads 32 --group-query-attention --num-query-groups 4 --kv-channels 128 --qk-layernorm
--num-experts 128 --moe-ffn-hidden-size 768 --moe-router-topk 8 --moe-router-dtype fp32
--moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss
--seq-length 4096 --max-position-embeddings 40960 --tokenizer-type HuggingFaceTokenizer
--make-vocab-size-divisible-by 1187 --use-mcore-models --rotary-percent 1.0 --rotary-base 1000000
--no-bias-swiglu-fusion --sequence-parallel
"""

DEEPSEEK_V3 = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion --disable-bias-linear
--untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion
--normalization RMSNorm --swiglu --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432
--num-attention-heads 128 --kv-channels 128 --multi-latent-attention --kv-lora-rank 512 --v-head-dim 128
--q-lora-rank 1536 --qk-head-dim 128 --qk-layernorm --qk-pos-emb-head-dim 64 --num-experts 256
--moe-layer-freq [0]*3+[1]*58 --moe-ffn-hidden-size 2048 --moe-router-dtype fp32
--moe-router-score-function sigmoid --moe-router-bias-update-rate 1e-3 --moe-router-enable-expert-bias
--moe-router-topk 8 --moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-pre-softmax
--moe-router-topk-scaling-factor 2.5 --moe-shared-expert-overlap --moe-shared-expert-intermediate-size 2048
--moe-aux-loss-coeff 1e-4 --moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall
--moe-token-drop-policy probs --seq-length 4096 --max-position-embeddings 163840
--tokenizer-type HuggingFaceTokenizer --make-vocab-size-divisible-by 1280 --use-mcore-models
--rotary-base 10000 --rotary-percent 1.0 --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0
--recompute-activations --moe-layer-recompute --sequence-parallel
"""

DEEPSEEK_V3_MODEL_ZOO = """
--distributed-timeout-minutes 60 --tensor-model-parallel-size {TP} --pipeline-model-parallel-size {PP}
--expert-model-parallel-size {EP} --context-parallel-size {CP} --expert-tensor-parallel-size 1
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--use-mcore-models --sequence-parallel --use-flash-attn --disable-bias-linear --micro-batch-size {MBS}
--global-batch-size {GBS} --train-samples 585937500 --exit-duration-in-mins 220 --no-save-optim
--no-check-for-nan-in-loss-and-grad --cross-entropy-loss-fusion --cross-entropy-fusion-impl native
--manual-gc --manual-gc-interval 10
--transformer-impl transformer_engine
--seq-length {SEQ_LEN} --data-cache-path {WORKSPACE}/data_cache --tokenizer-type HuggingFaceTokenizer
--tokenizer-model {TOKENIZER_MODEL} --data-path {DATA_PATH} --split 99,1,0 --no-mmap-bin-files
--no-create-attention-mask-in-dataloader --num-workers 6
--num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128 --kv-channels 128
--max-position-embeddings 4096 --position-embedding-type rope --rotary-base 10000
--make-vocab-size-divisible-by 3232 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
--untie-embeddings-and-output-weights --multi-latent-attention
--attention-dropout 0.0 --hidden-dropout 0.0 --clip-grad 1.0 --weight-decay 0.1 --qk-layernorm
--lr-decay-samples 584765624 --lr-warmup-samples 1536000 --lr-warmup-init 3.9e-7 --lr 3.9e-6 --min-lr 3.9e-7
--lr-decay-style cosine --adam-beta1 0.9 --adam-beta2 0.95
--num-experts 256 --moe-layer-freq ([0]*3+[1]*58) --moe-ffn-hidden-size 2048
--moe-shared-expert-intermediate-size 2048 --moe-router-load-balancing-type seq_aux_loss --moe-router-topk 8
--moe-grouped-gemm --moe-aux-loss-coeff 1e-4 --moe-router-group-topk 4 --moe-router-num-groups 8
--moe-router-topk-scaling-factor 2.5 --moe-router-score-function sigmoid --moe-router-enable-expert-bias
--moe-router-bias-update-rate 1e-3 --moe-router-dtype fp32 --moe-permute-fusion --moe-router-fusion
--q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
--rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0
--eval-iters 32 --eval-interval 200
--no-load-optim --no-load-rng --auto-detect-ckpt-format --load {LOAD_PATH} --save {OUTPUT_PATH}/checkpoints
--save-interval 500 --dist-ckpt-strictness log_all
--init-method-std 0.02
--log-timers-to-tensorboard --log-memory-to-tensorboard --log-validation-ppl-to-tensorboard --log-throughput
--log-interval 1 --logging-level 40 --tensorboard-dir {OUTPUT_PATH}/tensorboard --wandb-project {WANDB_PROJECT}
--wandb-exp-name DeepSeek-V3-TP{TP}PP{PP}EP{EP}CP{CP}VPP{VPP}-MBS{MBS}GBS{GBS}-{COMMENT}
--bf16 --enable-experimental
--moe-token-dispatcher-type alltoall
"""

QWEN3_30B_A3B_MODEL_ZOO = """
--distributed-timeout-minutes 60 --tensor-model-parallel-size {TP} --pipeline-model-parallel-size {PP}
--num-layers-per-virtual-pipeline-stage {LAYERS_PER_VP} --expert-model-parallel-size {EP}
--context-parallel-size {CP} --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce
--overlap-param-gather --no-create-attention-mask-in-dataloader
--use-mcore-models --sequence-parallel --use-flash-attn --disable-bias-linear --micro-batch-size {MBS}
--global-batch-size {GBS} --train-samples 268554688 --exit-duration-in-mins 230 --manual-gc --manual-gc-interval 5
--transformer-impl transformer_engine
--data-cache-path {WORKSPACE}/data_cache --tokenizer-type HuggingFaceTokenizer --tokenizer-model {TOKENIZER_MODEL}
--data-path {DATA_PATH} --split 99,1,0 --no-mmap-bin-files --num-workers 6
--untie-embeddings-and-output-weights --position-embedding-type rope --rotary-percent 1.0 --rotary-base 1000000
--rotary-seq-len-interpolation-factor 1 --normalization RMSNorm --swiglu --norm-epsilon 1e-06 --num-layers 48
--hidden-size 2048 --ffn-hidden-size 6144 --num-attention-heads 32 --group-query-attention --num-query-groups 4
--kv-channels 128 --qk-layernorm --seq-length {SEQ_LEN} --max-position-embeddings 40960
--make-vocab-size-divisible-by 1187
--attention-dropout 0.0 --hidden-dropout 0.0 --clip-grad 1.0 --weight-decay 0.1
--lr-decay-samples 255126953 --lr-warmup-samples 162761 --lr 1.2e-4 --min-lr 1.2e-5 --lr-decay-style cosine
--adam-beta1 0.9 --adam-beta2 0.95
--num-experts 128 --moe-ffn-hidden-size 768 --moe-router-load-balancing-type aux_loss --moe-router-topk 8
--moe-grouped-gemm --moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall --moe-permute-fusion
--moe-router-dtype fp32
--eval-iters 32 --eval-interval 500
--finetune --auto-detect-ckpt-format --load {LOAD_PATH} --save {OUTPUT_PATH}/checkpoints --save-interval 500
--dist-ckpt-strictness log_all
--init-method-std 0.02
--log-timers-to-tensorboard --log-memory-to-tensorboard --log-num-zeros-in-grad --log-params-norm
--log-validation-ppl-to-tensorboard --log-throughput --log-interval 1 --tensorboard-dir {OUTPUT_PATH}/tensorboard
--wandb-project {WANDB_PROJECT} --wandb-exp-name Qwen3-30B-A3B-TP{TP}PP{PP}EP{EP}CP{CP}VPP{VPP}-MBS{MBS}GBS{GBS}-{COMMENT}
--bf16
"""

# what sbatch_benchmarking.sh adds for its precisions (PR=bf16, its default, and PR=fp8)
MODEL_ZOO_PRECISION = {
    "bf16": "--tp-comm-overlap",
    "fp8": "--fp8-recipe blockwise --fp8-format e4m3 --fp8-param-gather --use-precision-aware-optimizer "
           "--main-grads-dtype fp32 --main-params-dtype fp32 --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 "
           "--moe-router-padding-for-fp8",
}

SCRIPTS = {"mixtral": MIXTRAL, "deepseek_v2_lite": DEEPSEEK_V2_LITE, "qwen3_30b_a3b": QWEN3_30B_A3B,
           "deepseek_v3": DEEPSEEK_V3, "deepseek_v3_model_zoo": DEEPSEEK_V3_MODEL_ZOO,
           "qwen3_30b_a3b_model_zoo": QWEN3_30B_A3B_MODEL_ZOO}


def script_argv(name: str, **paths: str) -> list[str]:
    """The script's flags with its placeholders filled in."""
    return [word.format(**paths) for word in SCRIPTS[name].split()]
