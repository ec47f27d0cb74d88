#!/usr/bin/env python
"""Measure the pipeline bubble: per stage, the step time and the time blocked in exchanges.

Runs training steps like pretrain_moe.py (same flags; default model: the 4-layer
DeepSeek-V2-Lite proxy of tools/bench_train.py, global batch 32) and, on every rank, times the
point-to-point exchanges with the device synchronised around them. What a stage spends blocked
there is its bubble (waiting for a neighbour) plus the transfers themselves; the rest of the
step is its own compute. Rank 0 prints one row per stage, averaged over the steps after
``--warmup``, with the ideal bubble of balanced stages for comparison:
1F1B (pp - 1) / (m + pp - 1), interleaved (pp - 1) / (vpp m + pp - 1), m micro-batches
(DualPipeV, ``--pipeline-schedule dualpipev``: (pp/2 - 1)(F&B + B - 3W) per rank).

    torchrun --nproc-per-node 2 tools/bench_pipeline.py --pipeline-model-parallel-size 2
    torchrun --nproc-per-node 2 tools/bench_pipeline.py --pipeline-model-parallel-size 2 \\
        --virtual-pipeline-model-parallel-size 2

Synchronising around every exchange costs a little overlap, so the step times here are for
the split, not for the throughput table (tools/bench_train.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.cli import exit_on_config_error, parse_config  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.launch import init_distributed, process_info_from_env  # noqa: E402
from megamoe.parallel.random import model_parallel_seed  # noqa: E402
from megamoe.training.train import MicroBatches, build_model, build_optimizer, train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PROXY  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="Steps left out of the mean.")
    parser.add_argument("--no-proxy", action="store_true", help="Do not prepend the V2-Lite proxy flags.")
    # Everything else goes to the training config (some torchrun versions drop a `--` separator).
    args, extra = parser.parse_known_args([a for a in sys.argv[1:] if a != "--"])
    info = process_info_from_env()
    flags = ([] if args.no_proxy else [*PROXY, "--global-batch-size", "32"]) + extra
    with exit_on_config_error("bench_pipeline.py"):
        config = parse_config(flags, prog="bench_pipeline.py")
        layout = validate(config, info.world_size)
    state, device = init_distributed(config.parallel, info)
    rng_tracker = model_parallel_seed(config.training.seed, state, device)
    model = build_model(config, state, device)
    optimizer = build_optimizer(model, config, state)
    data = MicroBatches(config, state, device)
    rows = []
    for step in range(1, args.iters + 1):
        batches = [data.get(step - 1, j) for j in range(data.num_micro)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        metrics = train_step(model, optimizer, batches, step, config, state, rng_tracker, time_pipeline=True)
        rows.append((time.perf_counter() - start, metrics.pipeline_wait))
    steady = rows[args.warmup:]
    mine = torch.tensor([state.pp.rank, sum(r[0] for r in steady) / len(steady),
                         sum(r[1] for r in steady) / len(steady)], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)] if info.world_size > 1 else [mine]
    if info.world_size > 1:
        dist.all_gather(everyone, mine)
    if info.rank == 0:
        pp, vpp, m = layout.pp, layout.vpp or 1, data.num_micro
        if config.parallel.pipeline_schedule == "dualpipev":  # depends on the F, B and W times
            ideal_text = "ideal bubble (pp/2 - 1)(F&B + B - 3W) per rank (DualPipeV)"
        else:
            ideal_text = f"ideal bubble of balanced stages {100 * (pp - 1) / (vpp * m + pp - 1):.1f}%"
        print(f"\npp {pp}, vpp {vpp}, {m} micro-batches of {data.micro}, steps {args.warmup + 1}-{args.iters}; "
              f"{ideal_text}")
        print(f"{'stage':>5}{'step (ms)':>11}{'blocked in p2p (ms)':>21}{'compute (ms)':>14}{'blocked %':>11}")
        for rank_row in sorted((tuple(t.tolist()) for t in everyone), key=lambda r: r[0]):
            stage, step_s, wait_s = rank_row
            print(f"{int(stage):>5}{1e3 * step_s:>11.1f}{1e3 * wait_s:>21.1f}{1e3 * (step_s - wait_s):>14.1f}"
                  f"{100 * wait_s / step_s:>11.1f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
