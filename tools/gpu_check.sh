#!/usr/bin/env bash
# Everything the GPU machine is for, in one call: the GPU test tier, then the training
# benchmark. Logs go to $OUT (device tool) or ./gpu_logs. Usage:
#   bash tools/gpu_check.sh [all|tests|bench BACKEND...|ep|moe|wgrad|pp|overlap|dp|cp|perf|ckpt|fp16|fp8|fp8te|fp8peers|fp8gather|fp8size|compile|optim]
# `ep` needs two GPUs: NCCL parity of EP/TP layouts and the MoE-layer benchmark at EP 1 and 2;
# `moe` runs only that benchmark. `wgrad` (one GPU): a MoE block's F, B, input-only B and deferred W
# (tools/bench_wgrad.py) and the pipeline bubbles they model. `pp` needs two GPUs: NCCL parity of pipeline layouts
# (interleaved, DualPipeV, MTP, tied head) and the per-stage bubble at PP 1 / 2 / 2 uneven /
# 2 x VPP 2 / 2 under DualPipeV.
# `cp` needs two GPUs: the ring's GPU test, NCCL parity of CP=2 (GQA, MLA; ring and all-gather)
# and the attention benchmark at CP 1 and 2 (32k and 128k tokens; every exchange).
# `overlap` needs two GPUs (issue 15): NCCL parity of the forward-backward pairing at EP 2 (with
# --delay-wgrad-compute, with full recompute) and under 1F1B at PP 2, then the V2-Lite proxy's
# per-GPU throughput at EP 1 and EP 2 (two micro-batches per rank) with each EP overlap mode off and on.
# `dp` needs two GPUs: the NCCL tier of the bucket tests, NCCL parity of DP 2 with overlapped
# reduction and the distributed optimizer, and how much of the gradient reduction hides behind
# backward (tools/bench_dp.py on the V2-Lite proxy at DP 2, with the per-bucket timeline); a few minutes.
# `perf` (one GPU; bring .gpu/peers, staged by ../shared/peers/stage-peers.sh): the GPU tests,
# MLA's attention on every SDPA backend, torchtitan compiled and megamoe (eager, --compile,
# --compile at micro-batch 16) side by side on the V2-Lite proxy, the head's GEMMs per chunk size
# (tools/bench_head.py), the optimizer's pieces (tools/bench_optimizer.py), then an eager and a
# --compile --profile run whose summaries land in $OUT/prof and $OUT/prof_compiled.
# `ckpt`: the GPU checkpoint tests (bring TE for the backend crossing), NCCL checkpoints across
# layouts when two GPUs are there, then synchronous save, async save and load times on the
# V2-Lite proxy (tools/bench_checkpoint.py; about 32 GB written under $CKPT_DIR, default /tmp).
# `fp16`: the V2-Lite proxy in bf16, then in fp16 with the dynamic loss scale (40 iterations each).
# `fp8`: the FP8 GPU tests, tools/bench_fp8.py (log in $OUT/bench_fp8.log), then the V2-Lite
# proxy 200 iterations in bf16 and under each native FP8 recipe (hybrid format; throughput and
# the loss curves, metrics in $OUT/metrics_*.jsonl), rowwise on the all-to-all dispatcher with
# and without --moe-fp8-dispatch (100 iterations), and a --profile run of bf16 and of the
# rowwise recipe (summaries in $OUT/profile_<recipe>.log). Iterations: FP8_ITERS.
# `fp8gather`: --fp8-param-gather's GPU test and the proxy with the distributed optimizer, bf16 against
# rowwise FP8 with and without the FP8 gather. `fp8size`: bf16, rowwise, and rowwise with
# --fp8-min-linear-size 1400, and a profile of the last. `compile`: profiles of bf16 and rowwise FP8
# (--fp8-min-linear-size 1400) under --compile.
# `fp8te` (Transformer Engine installed first, ../shared/gpu/README.md): the FP8 GPU tests with
# TE's, tools/bench_fp8.py with TE's modes, the proxy under TE's delayed / tensorwise / blockwise
# recipes and a profile of blockwise. `fp8peers` (bring .gpu/peers; TE installed): which cuDNN
# torch's attention gets with TE imported (tools/check_te_cudnn.py), megamoe bf16, native rowwise
# (--fp8-min-linear-size 1400) and TE blockwise, eager and --compile (FP8PEERS_COMPILED_ONLY=1: --compile
# only), native rowwise --compile with bf16 Adam moments, then Megatron-Core bf16 and FP8 blockwise, in one call.
# `optim` (one GPU): the optimizer's GPU tests (the Triton AdamW against torch's, the step writing the
# bf16 parameters under both optimizers, FP8 under the distributed optimizer), tools/bench_optimizer.py,
# the proxy in bf16 with each optimizer and with bf16 Adam moments (FP8_ITERS, default 50), and a
# --compile profile of bf16.
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
if [ "$mode" = ep ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -8
  python3 tools/check_parity.py --models mla gqa --layouts tp=1 ep=2,dp=2 ep=2,dp=2,dispatcher=alltoall \
    tp=2,sp tp=2,ep=2,etp=1,dispatcher=alltoall 2>&1 | tee "$LOG/parity_nccl.log" | grep -v "^ *\[" | tail -40
  python3 tools/bench_moe.py --json "$LOG/moe_ep1.json" 2>&1 | tail -12
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_moe.py --json "$LOG/moe_ep2.json" 2>&1 | tail -12
fi
if [ "$mode" = wgrad ]; then
  python3 tools/bench_wgrad.py --iters 10 2>&1 | tee "$LOG/bench_wgrad.log" | tail -14
fi
if [ "$mode" = moe ]; then
  python3 tools/bench_moe.py --json "$LOG/moe_ep1.json" 2>&1 | tail -10
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_moe.py --json "$LOG/moe_ep2.json" 2>&1 | tail -10
fi
if [ "$mode" = pp ]; then
  [ "${1:-}" = bubble ] || python3 tools/check_parity.py --models mla --layouts tp=1 pp=2 pp=2,vpp=2 \
    pp=2,schedule=dualpipev -- \
    --mtp-num-layers 1 --no-untie-embeddings-and-output-weights 2>&1 | tee "$LOG/parity_pp_nccl.log" \
    | grep -v "^ *\[" | tail -14
  python3 tools/bench_pipeline.py 2>&1 | tee "$LOG/bubble_pp1.log" | tail -4
  for layout in "" "--decoder-first-pipeline-num-layers 3" "--virtual-pipeline-model-parallel-size 2" \
      "--pipeline-schedule dualpipev"; do
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_pipeline.py \
      --pipeline-model-parallel-size 2 $layout 2>&1 | tee -a "$LOG/bubble_pp2.log" | tail -5
  done
fi
if [ "$mode" = cp ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/parallel/test_context_parallel.py 2>&1 | tail -3
  python3 tools/check_parity.py --models mla gqa --layouts tp=1 cp=2 cp=2,cp_comm=allgather 2>&1 \
    | tee "$LOG/parity_cp_nccl.log" | grep -v "^ *\[" | tail -16
  python3 tools/bench_cp.py --kernels 2>&1 | tee "$LOG/bench_cp1.log" | grep -v -i warn | tail -14
  for seq in 32768 131072; do
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_cp.py --seq-length $seq 2>&1 \
      | tee "$LOG/bench_cp2_$seq.log" | grep -v -i warn | tail -7
  done
fi
if [ "$mode" = overlap ]; then
  a2a="dispatcher=alltoall,moe_overlap"
  python3 tools/check_parity.py --models mla --layouts tp=1 "ep=2,dp=2,$a2a" "ep=2,dp=2,$a2a,delay_wgrad" \
    "ep=2,dp=2,$a2a,recompute=full" "pp=2,$a2a" --iters 3 -- --global-batch-size 8 2>&1 \
    | tee "$LOG/parity_overlap_nccl.log" | grep -v "^ *\[" | tail -20
  for extra in "" "--overlap-moe-expert-parallel-comm" "--overlap-moe-expert-parallel-comm --delay-wgrad-compute" \
      "--moe-a2a-overlap-chunks 2" "--moe-shared-expert-overlap"; do
    echo "== EP 1 $extra"
    python3 tools/bench_train.py --iters 12 -- --global-batch-size 16 --moe-token-dispatcher-type alltoall $extra \
      2>&1 | tee -a "$LOG/bench_overlap.log" | tail -3
    echo "== EP 2 $extra"
    python3 tools/bench_train.py --nproc 2 --iters 12 -- --global-batch-size 32 --moe-token-dispatcher-type alltoall \
      --expert-model-parallel-size 2 $extra 2>&1 | tee -a "$LOG/bench_overlap.log" | tail -3
  done
fi
if [ "$mode" = dp ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/parallel/test_data_parallel.py 2>&1 \
    | tee "$LOG/gpu_tests_dp.log" | tail -4
  python3 tools/check_parity.py --models mla --layouts tp=1 dp=2 dp=2,overlap,bucket=200000 dp=2,distopt \
    dp=2,distopt,overlap,gather,bucket=200000 2>&1 | tee "$LOG/parity_dp_nccl.log" | grep -v "^ *\[" | tail -22
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_dp.py --per-bucket --compare-order 2>&1 \
    | tee "$LOG/bench_dp.log" | tail -45
fi
if [ "$mode" = perf ]; then
  source .gpu/peers/install.sh
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -6
  python3 .gpu/peers/titan_bench.py --mbs 8 --compile 2>&1 | tee "$LOG/titan.log" | grep -E "^RESULT|^FAILED"
  python3 tools/bench_attention.py 2>&1 | tee "$LOG/bench_attention.log" | tail -6
  for extra in "" "--compile" "--compile --micro-batch-size 16 --global-batch-size 16"; do
    echo "== megamoe $extra"
    python3 tools/bench_train.py --backends torch -- $extra 2>&1 | tee -a "$LOG/bench_train.log" | tail -3
  done
  python3 tools/bench_head.py 2>&1 | tee "$LOG/bench_head.log" | tail -8
  python3 tools/bench_optimizer.py 2>&1 | tee "$LOG/bench_optimizer.log"
  proxy=$(python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_train; print(' '.join(bench_train.PROXY))")
  for extra in "" "--compile"; do
    python3 pretrain_moe.py $proxy --moe-grouped-gemm-impl torch --train-iters 7 --log-interval 7 --profile \
      --profile-step-start 4 --profile-step-end 6 --profile-dir "$LOG/prof${extra:+_compiled}" $extra 2>&1 \
      | tee "$LOG/profile${extra:+_compiled}.log" | grep -A 24 "^profile:"
  done
fi
if [ "$mode" = ckpt ]; then
  # the GPU checkpoint tests (torch <-> te expert backends need TE staged), then on two or more
  # GPUs NCCL checkpoints across layouts, then how long saves and loads block the V2-Lite proxy
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_checkpoint.py 2>&1 | tee "$LOG/gpu_tests_ckpt.log" | tail -4
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python3 tools/check_parity.py --models mla --layouts tp=1 "tp=2,sp>ep=2,dp=2,dispatcher=alltoall" \
      "ep=2,dp=2,distopt>tp=1" "tp=1>pp=2" --iters 3 --resume-at 2 2>&1 | tee "$LOG/parity_ckpt_nccl.log" \
      | grep -v "^ *\[" | tail -16
  fi
  python3 tools/bench_checkpoint.py --dir "${CKPT_DIR:-/tmp/megamoe_ckpt_bench}" 2>&1 | tee "$LOG/bench_checkpoint.log" \
    | grep -v -i warn | tail -10
fi
if [ "$mode" = fp16 ]; then
  # the V2-Lite proxy in bf16, then in fp16 with the dynamic loss scale, 40 iterations each
  proxy=$(python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_train; print(' '.join(f for f in bench_train.PROXY if f != '--bf16'))")
  for precision in "--bf16" "--no-bf16 --fp16"; do
    echo "== $precision"
    python3 pretrain_moe.py $proxy $precision --moe-grouped-gemm-impl torch --train-iters 40 --log-interval 10 \
      --metrics-file "$LOG/metrics${precision##* }.jsonl" 2>&1 | tee "$LOG/run${precision##* }.log" \
      | grep -E "iteration +[0-9]+/|Error|error" | cut -c1-420
  done
fi
if [ "$mode" = fp8 ] || [ "$mode" = fp8te ] || [ "$mode" = fp8peers ] || [ "$mode" = fp8gather ] || [ "$mode" = fp8size ] \
    || [ "$mode" = compile ] || [ "$mode" = optim ]; then
  proxy=$(python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_train; print(' '.join(bench_train.PROXY))")
  te_flags="--transformer-impl transformer_engine --moe-grouped-gemm-impl te --fp8-format hybrid"
  # the V2-Lite proxy for $iters iterations, metrics in $LOG/metrics_<name>.jsonl; the last lines on failure
  proxy_run() {
    local name=$1; shift
    echo "== $name"
    python3 pretrain_moe.py $proxy "$@" --train-iters "$iters" --log-interval 25 --metrics-file "$LOG/metrics_$name.jsonl" \
      > "$LOG/run_$name.log" 2>&1 || tail -20 "$LOG/run_$name.log"
    grep -E "iteration +[0-9]+/" "$LOG/run_$name.log" | cut -c1-300
  }
  # a --profile run of steps 4-6; its summary in $LOG/profile_<name>.log (traces stay on the machine)
  proxy_profile() {
    local name=$1; shift
    python3 pretrain_moe.py $proxy "$@" --train-iters 7 --log-interval 7 --profile --profile-step-start 4 \
      --profile-step-end 6 --profile-dir "/tmp/prof_$name" 2>&1 | tee "$LOG/profile_$name.log" | grep -A 30 "^profile:"
  }
fi
if [ "$mode" = fp8 ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$LOG/gpu_tests_fp8.log" | tail -8
  python3 tools/bench_fp8.py --profile 2>&1 > "$LOG/bench_fp8.log"; grep -E "^(case|experts|linear) " "$LOG/bench_fp8.log"
  rowwise="--fp8-format hybrid --fp8-recipe rowwise --moe-grouped-gemm-impl torch"
  iters="${FP8_ITERS:-200}"
  proxy_run bf16 --moe-grouped-gemm-impl torch
  proxy_run rowwise $rowwise
  proxy_run tensorwise --fp8-format hybrid --fp8-recipe tensorwise --moe-grouped-gemm-impl torch
  # FP8 dispatch (all-to-all dispatcher, EP 1 here): rowwise with and without it, 100 iterations
  iters=100
  proxy_run a2a $rowwise --moe-token-dispatcher-type alltoall
  proxy_run a2a_dispatch $rowwise --moe-token-dispatcher-type alltoall --moe-fp8-dispatch
  proxy_profile bf16 --moe-grouped-gemm-impl torch
  proxy_profile rowwise $rowwise
fi
if [ "$mode" = fp8gather ]; then
  # --fp8-param-gather on one GPU: its GPU test, then the proxy with the distributed optimizer in
  # bf16, native rowwise FP8, and rowwise with the FP8 gather (FP8_ITERS, default 100)
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_fp8_param_gather.py 2>&1 | tail -4
  iters="${FP8_ITERS:-100}"
  proxy_run distopt_bf16 --use-distributed-optimizer
  proxy_run distopt_rowwise --use-distributed-optimizer --fp8-format hybrid --fp8-recipe rowwise
  proxy_run distopt_rowwise_gather --use-distributed-optimizer --fp8-format hybrid --fp8-recipe rowwise --fp8-param-gather
  python3 tools/compare_runs.py bf16="$LOG/metrics_distopt_bf16.jsonl" rowwise="$LOG/metrics_distopt_rowwise.jsonl" \
    gather="$LOG/metrics_distopt_rowwise_gather.jsonl" --at 25 50 100
fi
if [ "$mode" = fp8size ]; then
  # --fp8-min-linear-size: bf16, native rowwise, and rowwise with the dense linears below 1400
  # (out x in / (out + in)) in bf16 (FP8_ITERS, default 100), then a profile of the last
  iters="${FP8_ITERS:-100}"
  proxy_run bf16
  proxy_run rowwise --fp8-format hybrid --fp8-recipe rowwise
  proxy_run rowwise_min1400 --fp8-format hybrid --fp8-recipe rowwise --fp8-min-linear-size 1400
  python3 tools/compare_runs.py bf16="$LOG/metrics_bf16.jsonl" rowwise="$LOG/metrics_rowwise.jsonl" \
    min1400="$LOG/metrics_rowwise_min1400.jsonl" --at 25 50 100
  proxy_profile rowwise_min1400 --fp8-format hybrid --fp8-recipe rowwise --fp8-min-linear-size 1400
fi
if [ "$mode" = compile ]; then
  # a profile of bf16 and of rowwise FP8 (--fp8-min-linear-size 1400) under --compile
  proxy_profile bf16_compiled --compile
  proxy_profile min1400_compiled --fp8-format hybrid --fp8-recipe rowwise --fp8-min-linear-size 1400 --compile
fi
if [ "$mode" = optim ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_optimizer.py tests/training/test_fp8_param_gather.py \
    2>&1 | tail -6
  python3 tools/bench_optimizer.py 2>&1 | tee "$LOG/bench_optimizer.log"
  iters="${FP8_ITERS:-50}"
  proxy_run bf16
  proxy_run distopt_bf16 --use-distributed-optimizer
  proxy_run bf16_moments --use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16
  python3 tools/compare_runs.py bf16="$LOG/metrics_bf16.jsonl" distopt="$LOG/metrics_distopt_bf16.jsonl" \
    bf16_moments="$LOG/metrics_bf16_moments.jsonl" --at 25 50
  proxy_profile bf16_compiled --compile
fi
if [ "$mode" = fp8te ]; then
  # after Transformer Engine is installed: the GPU FP8 tests (TE's included), tools/bench_fp8.py
  # with TE's modes, the proxy under each TE recipe (FP8_ITERS, default 200) and a profile of blockwise
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$LOG/gpu_tests_fp8te.log" | tail -15
  python3 tools/bench_fp8.py --profile > "$LOG/bench_fp8.log" 2>&1; grep -E "^(case|experts|linear) |Error" "$LOG/bench_fp8.log"
  iters="${FP8_ITERS:-200}"
  for recipe in blockwise tensorwise delayed; do proxy_run "te_$recipe" $te_flags --fp8-recipe "$recipe"; done
  proxy_profile te_blockwise $te_flags --fp8-recipe blockwise
fi
if [ "$mode" = fp8peers ]; then
  # the same-call ratios (bring .gpu/peers; Megatron-Core needs TE installed): megamoe bf16 and
  # native rowwise FP8 (FP8_ITERS, default 100), then Megatron-Core bf16 and FP8 blockwise
  for probe in none te megamoe; do python3 tools/check_te_cudnn.py $probe 2>&1 | grep -E "^$probe |Error"; done
  iters="${FP8_ITERS:-100}"
  # FP8PEERS_COMPILED_ONLY=1: megamoe's --compile runs only (its fastest; half the call's time)
  variants=("" "--compile"); [ "${FP8PEERS_COMPILED_ONLY:-0}" = 1 ] && variants=("--compile")
  for compiled in "${variants[@]}"; do
    proxy_run "bf16${compiled:+_compiled}" $compiled
    proxy_run "rowwise${compiled:+_compiled}" --fp8-format hybrid --fp8-recipe rowwise --fp8-min-linear-size 1400 \
      $compiled
    proxy_run "te_blockwise${compiled:+_compiled}" $te_flags --fp8-recipe blockwise $compiled
  done
  # the fastest FP8 run again with Adam's moments in bf16 (8 of 30 bytes a parameter less optimizer traffic)
  proxy_run rowwise_compiled_bf16_moments --fp8-format hybrid --fp8-recipe rowwise --fp8-min-linear-size 1400 --compile \
    --use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16
  source .gpu/peers/install.sh
  for fp8 in none blockwise; do
    python3 .gpu/peers/mcore_bench.py --optim mcore --mbs 8 --fp8 $fp8 2>&1 | tee "$LOG/mcore_$fp8.log" | grep RESULT \
      || tail -20 "$LOG/mcore_$fp8.log"
  done
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  python3 tools/bench_train.py --backends "${@:-torch}" 2>&1 | tee "$LOG/bench_train.log" | tail -30
fi
