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
steps after ``--warmup``; the optimizer step is not run (it is the same in both). The buckets
launch in the order the first overlapped step observed (a warm-up step);
``--compare-order`` times the overlapped steps once more with the order guessed from
registration, the order used before that observation.

Per bucket (``--per-bucket``, CUDA): the last overlapped step again, with CUDA events recorded
from outside the buckets (their start and wait are wrapped here): when each bucket started
relative to the end of backward (negative: during it), when its wait returned, and the part of
the exposed time that is its own (the time its wait added after the previous bucket's).
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


def bucket_timeline(model, grads: DataParallelGrads, data: MicroBatches, rng, step: int) -> list[tuple]:
    """One overlapped step with events around every bucket: per bucket in launch order, (order,
    buffer, MB, started in backward, start ms, done ms, own exposed ms); times from the end of
    backward."""
    marks: dict[tuple[int, str], torch.cuda.Event] = {}

    def mark(key) -> None:
        marks[key] = torch.cuda.Event(enable_timing=True)
        marks[key].record()

    originals = [(b, b.start_grad_reduce, b.wait_grad_reduce) for b in grads.buckets]
    for b, start, wait in originals:
        b.start_grad_reduce = lambda rs, b=b, start=start: (mark((b.order, "start")), start(rs))
        b.wait_grad_reduce = lambda b=b, wait=wait: (wait(), mark((b.order, "done")))
    try:
        grads.start_step(data.num_micro)
        for j in range(data.num_micro):
            batch = data.get(step, j)
            out = model(batch["tokens"], batch["labels"], batch["loss_mask"], rng)
            (out.lm_loss_sum / out.num_tokens + sum(s.aux_loss + s.z_loss for s in out.moe_stats)).backward()
        mark((-1, "backward"))
        grads.finish()
        torch.cuda.synchronize()
    finally:
        for b, start, wait in originals:
            b.start_grad_reduce, b.wait_grad_reduce = start, wait
    end = marks[(-1, "backward")]
    rows, previous = [], 0.0
    for b in sorted(grads.buckets, key=lambda b: end.elapsed_time(marks[(b.order, "done")])):
        started, done = end.elapsed_time(marks[(b.order, "start")]), end.elapsed_time(marks[(b.order, "done")])
        rows.append((b.order, b.buffer.name, b.grad_data.numel() * b.grad_data.element_size() / 1e6,
                     b.launched_in_backward, started, done, max(done, 0.0) - max(previous, 0.0)))
        previous = max(previous, done)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_dp.py")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of the mean.")
    parser.add_argument("--no-proxy", action="store_true", help="Do not prepend the V2-Lite proxy flags.")
    parser.add_argument("--per-bucket", action="store_true", help="Time every bucket of one more step (CUDA).")
    parser.add_argument("--compare-order", action="store_true",
                        help="Also time the overlapped steps with the buckets in registration order.")
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
    results, timelines = {}, {}
    for reduce_scatter in (False, True):
        grads = DataParallelGrads(params, state, overlap=True, reduce_scatter=reduce_scatter,
                                  bucket_size=config.parallel.ddp_bucket_size)
        compute, reduction = run_mode(model, grads, data, rng, args.iters, args.warmup, False, device)
        total, _ = run_mode(model, grads, data, rng, args.iters, args.warmup, True, device)
        guessed = total
        if args.per_bucket and device.type == "cuda":
            timelines[reduce_scatter] = bucket_timeline(model, grads, data, rng, args.iters)
        nbytes, nbuckets = grads.grad_bytes(), len(grads.buckets)
        grads.remove_hooks()
        del grads
        if args.compare_order:
            grads = DataParallelGrads(params, state, overlap=True, reduce_scatter=reduce_scatter,
                                      bucket_size=config.parallel.ddp_bucket_size, follow_observed_order=False)
            guessed, _ = run_mode(model, grads, data, rng, args.iters, args.warmup, True, device)
            grads.remove_hooks()
            del grads
        results[reduce_scatter] = (compute, reduction, total, guessed, nbytes, nbuckets)
    mine = torch.tensor([v for r in results.values() for v in r[:4]], dtype=torch.float64, device=device)
    if info.world_size > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if info.rank == 0:
        n = sum(p.numel() for p in params)
        print(f"\nDP {info.world_size}, {n:,} parameters, {data.num_micro} micro-batches of {data.micro} per rank, "
              f"steps {args.warmup + 1}-{args.iters} (max over ranks)")
        print(f"{'reduction':<16}{'buckets':>8}{'GB':>7}{'compute':>10}{'reduction':>11}{'overlapped':>12}"
              f"{'exposed':>9}{'hidden':>8}" + (f"{'exposed, registration order':>29}" if args.compare_order else "")
              + "   (ms)")
        for i, (reduce_scatter, (*_, nbytes, nbuckets)) in enumerate(results.items()):
            compute, reduction, total, guessed = (1e3 * x for x in mine[4 * i:4 * i + 4].tolist())
            exposed = max(total - compute, 0.0)
            hidden = 1 - exposed / reduction if reduction > 0 else float("nan")
            name = "reduce-scatter" if reduce_scatter else "all-reduce"
            print(f"{name:<16}{nbuckets:>8}{nbytes / 1e9:>7.2f}{compute:>10.1f}{reduction:>11.1f}{total:>12.1f}"
                  f"{exposed:>9.1f}{100 * hidden:>7.0f}%"
                  + (f"{max(guessed - compute, 0.0):>29.1f}" if args.compare_order else ""))
        for reduce_scatter, rows in timelines.items():
            print(f"\n{'reduce-scatter' if reduce_scatter else 'all-reduce'}, rank 0, ms from the end of backward:")
            print(f"{'bucket':>6}  {'buffer':<10}{'MB':>8}{'in bwd':>8}{'start':>9}{'done':>9}{'own exposed':>13}")
            for order, name, mb, in_bwd, started, done, own in rows:
                print(f"{order:>6}  {name:<10}{mb:>8.1f}{'yes' if in_bwd else 'no':>8}{started:>9.1f}{done:>9.1f}{own:>13.1f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
