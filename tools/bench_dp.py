#!/usr/bin/env python
"""How much of the data-parallel gradient reduction hides behind backward (DP = world size).

    torchrun --nproc-per-node 2 tools/bench_dp.py                     # V2-Lite 4-layer proxy, bf16
    torchrun --nproc-per-node 2 tools/bench_dp.py --iters 4 --num-layers 2   # other flags: training config

For the all-reduce (whole optimizer) and the reduce-scatter (distributed optimizer), each step
runs forward + backward over this rank's micro-batches, then ``finish()`` of the gradient
buckets (:mod:`megamoe.parallel.data_parallel`), twice:

- reduction after backward: the device is synchronised at the end of backward, so ``compute``
  is forward + backward alone and ``reduction`` the whole reduction, exposed;
- ``--overlap-grad-reduce``: buckets start during the last backward; only the total is timed
  (a synchronisation would wait for the collectives too).

``exposed = total(overlap) - compute`` and ``hidden = 1 - exposed / reduction``. Means over the
steps after ``--warmup``; the optimizer step is not run (it is the same in both).
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
from megamoe.parallel.data_parallel import DataParallelGrads  # noqa: E402
from megamoe.parallel.launch import init_distributed, process_info_from_env  # noqa: E402
from megamoe.parallel.random import model_parallel_seed  # noqa: E402
from megamoe.training.train import MicroBatches, build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PROXY  # noqa: E402


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_mode(model, grads: DataParallelGrads, data: MicroBatches, rng, iters: int, warmup: int,
             overlap: bool, device: torch.device) -> tuple[float, float]:
    """Mean (compute, reduction) seconds; with ``overlap``, (total, 0)."""
    rows = []
    for step in range(iters):
        batches = [data.get(step, j) for j in range(data.num_micro)]
        start = _sync(device)
        grads.start_step(data.num_micro if overlap else None)
        for b in batches:
            out = model(b["tokens"], b["labels"], b["loss_mask"], rng)
            loss = out.lm_loss_sum / out.num_tokens + sum(s.aux_loss + s.z_loss for s in out.moe_stats)
            loss.backward()
        mid = None if overlap else _sync(device)
        grads.finish()
        end = _sync(device)
        rows.append((end - start, 0.0) if overlap else (mid - start, end - mid))
    steady = rows[warmup:]
    return tuple(sum(r[i] for r in steady) / len(steady) for i in range(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_dp.py")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of the mean.")
    parser.add_argument("--no-proxy", action="store_true", help="Do not prepend the V2-Lite proxy flags.")
    # Everything else goes to the training config (torchrun 2.11 drops a lone `--`).
    args, extra = parser.parse_known_args([a for a in sys.argv[1:] if a != "--"])
    info = process_info_from_env()
    # micro-batch 4: two micro-batches per rank at DP 2, so accumulation is exercised too
    flags = ([] if args.no_proxy else [*PROXY, "--micro-batch-size", "4",
                                       "--global-batch-size", str(8 * info.world_size)]) + extra
    with exit_on_config_error("bench_dp.py"):
        config = parse_config(flags, prog="bench_dp.py")
        layout = validate(config, info.world_size)
    if layout.dp != info.world_size:
        raise SystemExit("bench_dp.py: run pure data parallel (no TP / PP / CP flags)")
    state, device = init_distributed(config.parallel, info)
    rng = model_parallel_seed(config.training.seed, state, device)
    model = build_model(config, state, device)
    model.train()
    data = MicroBatches(config, state, device)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for reduce_scatter in (False, True):
        grads = DataParallelGrads(params, state, overlap=True, reduce_scatter=reduce_scatter,
                                  bucket_size=config.parallel.ddp_bucket_size)
        compute, reduction = run_mode(model, grads, data, rng, args.iters, args.warmup, False, device)
        total, _ = run_mode(model, grads, data, rng, args.iters, args.warmup, True, device)
        results[reduce_scatter] = (compute, reduction, total, grads.grad_bytes(), len(grads.buckets))
        grads.remove_hooks()
        del grads
    mine = torch.tensor([v for r in results.values() for v in r[:3]], dtype=torch.float64, device=device)
    if info.world_size > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if info.rank == 0:
        n = sum(p.numel() for p in params)
        print(f"\nDP {info.world_size}, {n:,} parameters, {data.num_micro} micro-batches of {data.micro} per rank, "
              f"steps {args.warmup + 1}-{args.iters} (max over ranks)")
        print(f"{'reduction':<16}{'buckets':>8}{'GB':>7}{'compute':>10}{'reduction':>11}{'overlapped':>12}"
              f"{'exposed':>9}{'hidden':>8}   (ms)")
        for i, (reduce_scatter, (_, _, _, nbytes, nbuckets)) in enumerate(results.items()):
            compute, reduction, total = (1e3 * x for x in mine[3 * i:3 * i + 3].tolist())
            exposed = max(total - compute, 0.0)
            hidden = 1 - exposed / reduction if reduction > 0 else float("nan")
            name = "reduce-scatter" if reduce_scatter else "all-reduce"
            print(f"{name:<16}{nbuckets:>8}{nbytes / 1e9:>7.2f}{compute:>10.1f}{reduction:>11.1f}{total:>12.1f}"
                  f"{exposed:>9.1f}{100 * hidden:>7.0f}%")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
