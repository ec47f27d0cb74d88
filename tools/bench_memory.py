#!/usr/bin/env python
"""Bytes per parameter per rank of the training state, with and without the distributed
optimizer, for several data-parallel sizes: measured from the tensors the optimizer allocates.

For each DP size, ``DP`` gloo processes (CPU) build the model, its optimizer, and run one
training step (Adam allocates its moments on the first step); then each rank sums
``numel x element_size`` of the model parameters, the float32 main-gradient buffers, the
float32 master weights and Adam's states, and divides by the model's parameter count.

    python tools/bench_memory.py                          # the demo model, bf16, DP 1 / 2 / 4
    python tools/bench_memory.py --dp 1 2 --hidden-size 256   # other flags go to the training config

Expected: bf16 parameters 2, main gradients 4, and 12 bytes of optimizer state (master 4 + Adam
8) without sharding, 12 / DP with ``--use-distributed-optimizer`` (plus bucket padding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamoe.cli import parse_config  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.random import model_parallel_seed  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.testing.distributed import run_distributed  # noqa: E402
from megamoe.training.train import MicroBatches, build_model, build_optimizer, train_step  # noqa: E402


def measure(flags: list[str]) -> dict[str, float]:
    """On every rank: bytes per parameter of each part of the training state after one step."""
    torch.set_num_threads(1)
    config = parse_config(flags, prog="bench_memory.py")
    state = ParallelState.build(**config.parallel.degrees())
    validate(config, state.layout.world_size)
    device = torch.device("cpu")
    model = build_model(config, state, device)
    optimizer = build_optimizer(model, config, state)
    data = MicroBatches(config, state, device)
    rng = model_parallel_seed(config.training.seed, state, device)
    train_step(model, optimizer, [data.get(0, j) for j in range(data.num_micro)], 1, config, state, rng)
    optimizer.finish_param_sync()
    n = sum(p.numel() for p in model.parameters())
    return {"num_params": n, **{k: v / n for k, v in optimizer.memory_bytes().items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_memory.py")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4], help="Data-parallel sizes (default 1 2 4).")
    parser.add_argument("--no-bf16", action="store_true", help="float32 parameters (their own masters).")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    extra = [a for a in extra if a != "--"]
    demo = ["--config", str(ROOT / "examples" / "configs" / "demo.yaml")]
    base = demo + (["--bf16"] if not args.no_bf16 else []) + [
        "--global-batch-size", str(max(args.dp)), "--micro-batch-size", "1", "--eval-iters", "0"] + extra
    print(f"{'optimizer':<13}{'DP':>3}{'params':>10}{'main grad':>11}{'master':>9}{'Adam m+v':>10}"
          f"{'optimizer':>11}{'total':>8}   (bytes per parameter, max over ranks)")
    for distributed in (False, True):
        for dp in args.dp:
            flags = base + (["--use-distributed-optimizer"] if distributed else [])
            ranks = run_distributed(measure, dp, args=(flags,), timeout=600.0)
            worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
            opt = worst["masters"] + worst["adam_states"]
            total = worst["params"] + worst["main_grads"] + opt
            print(f"{'distributed' if distributed else 'whole':<13}{dp:>3}{worst['params']:>10.3f}"
                  f"{worst['main_grads']:>11.3f}{worst['masters']:>9.3f}{worst['adam_states']:>10.3f}"
                  f"{opt:>11.3f}{total:>8.3f}")
    print(f"\nmodel: {ranks[0]['num_params']:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
