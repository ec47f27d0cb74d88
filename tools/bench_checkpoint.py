#!/usr/bin/env python
"""How long checkpoints block training, on one process: a synchronous save, an async save
(the copy to CPU memory that blocks, then the background write), and a load, against one
training step; with the bytes written and the write rate.

    python tools/bench_checkpoint.py                               # the V2-Lite proxy (GPU)
    python tools/bench_checkpoint.py --dir /local/ckpt
    python tools/bench_checkpoint.py -- --config examples/configs/demo.yaml --seq-length 16   # any model (CPU)

Flags after ``--`` replace the proxy's (tools/bench_train.py). Each checkpoint is deleted after
it is measured, so the disk needs room for one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import PROXY  # noqa: E402
from megamoe.cli import parse_config  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.random import model_parallel_seed  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.training.checkpoint import AsyncSaver, load_checkpoint, save_checkpoint  # noqa: E402
from megamoe.training.train import MicroBatches, build_model, build_optimizer, train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> int:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else PROXY
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/megamoe_ckpt_bench", help="Where the checkpoints go (one at a time).")
    args = p.parse_args(own)
    config = parse_config(flags)
    validate(config, 1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    state = ParallelState.single()
    tracker = model_parallel_seed(config.training.seed, state, device)
    model = build_model(config, state, device)
    optimizer = build_optimizer(model, config, state)
    data = MicroBatches(config, state, device)

    def step(i: int) -> float:
        batches = [data.get(i - 1, j) for j in range(data.num_micro)]
        _sync(device)
        began = time.perf_counter()
        train_step(model, optimizer, batches, i, config, state, tracker)
        _sync(device)
        return time.perf_counter() - began

    def row(name: str, seconds: float, nbytes: int | None = None) -> None:  # printed as measured
        rate = "" if nbytes is None else f"{nbytes / seconds / 1e9:.2f}"
        print(f"{name:<48}{seconds:>9.2f}{rate:>8}", flush=True)

    params = sum(t.numel() for t in model.parameters())
    print(f"{params:,} parameters ({device.type}); checkpoints under {args.dir}")
    print(f"{'':<48}{'seconds':>9}{'GB/s':>8}")
    step(1)
    row("one training step", step(2))  # Adam's states exist now
    shutil.rmtree(args.dir, ignore_errors=True)

    began = time.perf_counter()
    save_checkpoint(args.dir, 2, model, optimizer, state, config, 2 * data.global_batch, tracker, device)
    sync_s = time.perf_counter() - began
    size = _bytes(args.dir)
    print(f"checkpoint: {size / 1e9:.3f} GB")
    row("synchronous save (blocks all of it)", sync_s, size)

    began = time.perf_counter()
    load_checkpoint(args.dir, model, optimizer, state, config, tracker, device)
    _sync(device)
    row("load", time.perf_counter() - began, size)
    shutil.rmtree(args.dir)

    saver = AsyncSaver(state, device)
    began = time.perf_counter()
    saver.start(args.dir, 3, model, optimizer, config, 3 * data.global_batch, tracker)
    row("async save: blocked (copy to CPU memory)", time.perf_counter() - began)
    row("async save: a training step during the write", step(3))
    saver.wait()
    row("async save: start to recorded", time.perf_counter() - began, size)
    shutil.rmtree(args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
