"""How long one small collective takes on this machine's gloo worker pools, per world size.

The CPU test tier's multi-rank tests spend most of their time waiting in collectives, not
computing: this prints the mean time of a 64-element float64 all-reduce on pools of 2, 4 and 8
ranks (the suite's pools: megamoe/testing/distributed.py), and the pool's start-up time.

    python tools/bench_gloo.py [--world-sizes 2 4 8] [--calls 300]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from megamoe.testing.distributed import DistributedWorkers


def time_all_reduce(calls: int) -> float:
    """Milliseconds per all-reduce of 64 float64 values, after a barrier."""
    x = torch.ones(64, dtype=torch.float64)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(x)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    print(f"{'ranks':>5} {'pool start (s)':>15} {'all-reduce (ms)':>16}")
    for world_size in args.world_sizes:
        start = time.perf_counter()
        with DistributedWorkers(world_size, backend="gloo", timeout=300.0) as pool:
            pool.run(time_all_reduce, 10)  # the first call starts the ranks
            started = time.perf_counter() - start
            per_call = max(pool.run(time_all_reduce, args.calls))
        print(f"{world_size:>5} {started:>15.1f} {per_call:>16.2f}")


if __name__ == "__main__":
    main()
