#!/usr/bin/env python
"""How long checkpoints block training, on one process: a synchronous save, a load, and async
saves (the copy that blocks, then the background write while training goes on: the first, one
reusing the host buffers, one forced past the GPU copy), against one training step; with the
bytes written and the write rate.

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
from megamoe.training import checkpoint, snapshot  # noqa: E402
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
    p.add_argument("--writer-threads", type=int, nargs="+", default=[checkpoint.WRITER_THREADS],
                   help="Synchronous saves with each of these numbers of writer threads per rank (the "
                        f"default is megamoe's, {checkpoint.WRITER_THREADS}); the async saves use the default.")
    p.add_argument("--no-async", action="store_true", help="Only the synchronous saves and the load.")
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
        print(f"{name:<60}{seconds:>9.2f}{rate:>8}", flush=True)

    params = sum(t.numel() for t in model.parameters())
    print(f"{params:,} parameters ({device.type}); checkpoints under {args.dir}")
    print(f"{'':<60}{'seconds':>9}{'GB/s':>8}")
    step(1)
    row("one training step", step(2))  # Adam's states exist now
    shutil.rmtree(args.dir, ignore_errors=True)

    default_threads = checkpoint.WRITER_THREADS
    for threads in args.writer_threads:
        checkpoint.WRITER_THREADS = threads
        shutil.rmtree(args.dir, ignore_errors=True)
        began = time.perf_counter()
        save_checkpoint(args.dir, 2, model, optimizer, state, config, 2 * data.global_batch, tracker, device)
        sync_s = time.perf_counter() - began
        size = _bytes(args.dir)
        row(f"synchronous save, {threads} writer threads (blocks all of it)", sync_s, size)
    checkpoint.WRITER_THREADS = default_threads
    print(f"checkpoint: {size / 1e9:.3f} GB")

    began = time.perf_counter()
    load_checkpoint(args.dir, model, optimizer, state, config, tracker, device)
    _sync(device)
    row("load", time.perf_counter() - began, size)
    shutil.rmtree(args.dir)
    if args.no_async:
        return 0

    saver = AsyncSaver(state, device)
    it = 3
    labels = ["first", "again (host buffers reused)"] + (["no GPU room (straight to the host)"] if device.type == "cuda" else [])
    for label in labels:
        if label.startswith("no GPU"):
            snapshot.gpu_room = lambda device: 0
        began = time.perf_counter()
        saver.start(args.dir, it, model, optimizer, config, it * data.global_batch, tracker)
        row(f"async save {label}: blocked", time.perf_counter() - began)
        print(f"  the copy went to {saver.snapshot.where}")
        during = []
        while saver.poll() is None:  # train until every rank's write is done
            it += 1
            during.append(step(it))
        row(f"  start to recorded ({len(during)} steps meanwhile)", time.perf_counter() - began, size)
        if during:
            row("  mean step while writing", sum(during) / len(during))
        shutil.rmtree(args.dir)
        it += 1
    saver.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
