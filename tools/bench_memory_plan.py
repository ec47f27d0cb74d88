#!/usr/bin/env python
"""The layout planner's peak memory per GPU against ``torch.cuda.max_memory_allocated`` in
training, case by case (issue 17's validation). On the CPU the counter is
``megamoe.testing.live_bytes.LiveBytes`` and the plan models torch's CPU kernels.

Each case runs in a fresh process (torchrun for more than one GPU): the model, optimizer and
mock data built as training builds them, five training steps, and per rank the peak of the
forward-backward, of the optimizer step and of the whole step, and the step time (the mean of
the last three). Beside them, the planner's prediction for the same rank from the layout
alone: training state + the activations the schedule holds at its peak (the loss's included) +
the larger transient, the head's forward or the backward's (less the loss's kept bytes, freed
by then); and its step-time estimate (``megamoe/training/step_time.py``).

    python tools/bench_memory_plan.py --case "none mbs4" -- <flags> [--case ... -- <flags>]
    python tools/bench_memory_plan.py --proxy-cases          # the V2-Lite proxy table of docs/benchmarks.md
    python tools/bench_memory_plan.py --nproc 2 --case "tp2" -- <flags> --tensor-model-parallel-size 2

Prints one row per case and rank: measured and predicted GiB, step seconds, and the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
ITERATIONS, WARMUP = 5, 2  # step time: the mean of the steps after the warm-up ones
PROXY = ["--config", "examples/configs/deepseek_v2_lite.yaml", "--num-layers", "4", "--moe-layer-freq",
         "[0]*1+[1]*3", "--seq-length", "4096", "--bf16", "--moe-grouped-gemm-impl", "torch"]
PROXY_CASES = {
    "none, mbs 1 x 4": ["--micro-batch-size", "1", "--global-batch-size", "4"],
    "none, mbs 4": ["--micro-batch-size", "4", "--global-batch-size", "4"],
    "none, mbs 8": ["--micro-batch-size", "8", "--global-batch-size", "8"],
    "selective, mbs 4": ["--micro-batch-size", "4", "--global-batch-size", "4", "--recompute-granularity",
                         "selective"],
    "moe, mbs 4": ["--micro-batch-size", "4", "--global-batch-size", "4", "--moe-layer-recompute"],
    "moe, mbs 8": ["--micro-batch-size", "8", "--global-batch-size", "8", "--moe-layer-recompute"],
    "full, mbs 4": ["--micro-batch-size", "4", "--global-batch-size", "4", "--recompute-granularity", "full"],
    "full, mbs 8": ["--micro-batch-size", "8", "--global-batch-size", "8", "--recompute-granularity", "full"],
    "none, mbs 4, alltoall, distopt": ["--micro-batch-size", "4", "--global-batch-size", "4",
                                       "--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer"],
}


def measure(flags: list[str]) -> dict:
    """On this rank: five training steps' peaks and time, and the planner's predictions."""
    import torch

    from megamoe.cli import parse_config
    from megamoe.config_validation import validate
    from megamoe.parallel.launch import init_distributed, process_info_from_env
    from megamoe.parallel.random import model_parallel_seed
    from megamoe.parallel.state import ParallelState
    from megamoe.training.activation_plan import stage_plan
    from megamoe.training.layout_plan import plan_stages
    from megamoe.training.memory_plan import state_bytes
    from megamoe.training.train import MicroBatches, build_model, build_optimizer, train_step

    from megamoe.testing.live_bytes import LiveBytes

    info = process_info_from_env()
    config = parse_config(flags, prog="bench_memory_plan.py")
    validate(config, info.world_size)
    state, device = init_distributed(config.parallel, info)
    cuda = device.type == "cuda"
    live = None if cuda else LiveBytes().__enter__()  # on the CPU: every tensor from here on

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else live.peak

    def reset_peak() -> None:
        torch.cuda.reset_peak_memory_stats(device) if cuda else live.reset_peak()

    rng = model_parallel_seed(config.training.seed, state, device)
    model = build_model(config, state, device)
    optimizer = build_optimizer(model, config, state)
    data = MicroBatches(config, state, device)
    peaks = {"forward_backward": 0, "step": 0}
    step = optimizer.step

    def measured_step(*args, **kwargs):
        peaks["forward_backward"] = max(peaks["forward_backward"], peak())
        reset_peak()
        step(*args, **kwargs)
        peaks["step"] = max(peaks["step"], peak())

    optimizer.step = measured_step
    times = []
    for iteration in range(1, ITERATIONS + 1):
        reset_peak()
        start = time.perf_counter()
        train_step(model, optimizer, [data.get(iteration, j) for j in range(data.num_micro)], iteration, config,
                   state, rng)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    planning = ParallelState.without_process_groups(state.layout, state.rank)
    planned_state = state_bytes(config, planning)
    plan = stage_plan(config, planning, data.num_micro, cpu=not cuda)
    # the step-time estimate of this rank's stage, for a job on one node
    estimate = next(p.step.total for p in plan_stages(config, state.layout, info.world_size)
                    if p.stage == state.pp.rank)
    if live is not None:
        live.__exit__(None, None, None)
    return {"rank": state.rank, "measured": max(peaks.values()) / GIB,
            "step_s": statistics.mean(times[WARMUP:]), "predicted_step_s": estimate,
            "forward_backward": peaks["forward_backward"] / GIB, "step": peaks["step"] / GIB,
            "state": planned_state.total / GIB, "kept": plan.kept_peak / GIB,
            "head_transient": plan.head_transient / GIB, "backward_transient": plan.backward_transient / GIB,
            "head": plan.head / GIB, "in_flight": plan.in_flight, "predicted": (planned_state.total + plan.peak) / GIB}


def _worker(flags: list[str], out: str) -> None:
    result = measure(flags)
    with open(f"{out}.{result['rank']}", "w") as f:
        json.dump(result, f)


def run_case(flags: list[str], nproc: int, tmp: Path) -> list[dict]:
    out = tmp / "result"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tools.bench_memory_plan import _worker; " \
           f"_worker({flags!r}, {str(out)!r})"
    script = tmp / "case.py"
    script.write_text(code)
    proc = subprocess.run([*launcher, str(script)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        return []
    return [json.loads(p.read_text()) for p in sorted(tmp.glob("result.*"))]


def main() -> int:
    import tempfile

    argv = sys.argv[1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--proxy-cases", action="store_true", help="the V2-Lite proxy cases on one GPU")
    # "--case NAME -- flags" pairs: split argv at each --case
    cases: dict[str, list[str]] = {}
    own: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--case":
            name = argv[i + 1]
            j = i + 2
            if j < len(argv) and argv[j] == "--":
                j += 1
            end = next((k for k in range(j, len(argv)) if argv[k] == "--case"), len(argv))
            cases[name] = argv[j:end]
            i = end
        else:
            own.append(argv[i])
            i += 1
    args = p.parse_args(own)
    if args.proxy_cases:
        cases.update({name: PROXY + extra for name, extra in PROXY_CASES.items()})
    print(f"{'case':<34} {'rank':>4} {'measured':>9} {'fwd+bwd':>8} {'step':>7} | {'state':>7} {'kept':>7} "
          f"{'in flight':>9} {'head':>6} {'head fwd':>8} {'backward':>8} {'predicted':>9} {'error':>7}  (GiB) | "
          f"{'step s':>7} {'estimate':>8} {'error':>7}", flush=True)
    for name, flags in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            for r in run_case(flags, args.nproc, Path(tmp)):
                error = (r["predicted"] - r["measured"]) / r["measured"]
                print(f"{name:<34} {r['rank']:>4} {r['measured']:>9.2f} {r['forward_backward']:>8.2f} {r['step']:>7.2f} | "
                      f"{r['state']:>7.2f} {r['kept']:>7.2f} {r['in_flight']:>9} {r['head']:>6.2f} {r['head_transient']:>8.2f} "
                      f"{r['backward_transient']:>8.2f} "
                      f"{r['predicted']:>9.2f} {error:>+7.1%} | {r['step_s']:>7.3f} {r['predicted_step_s']:>8.3f} "
                      f"{(r['predicted_step_s'] - r['step_s']) / r['step_s']:>+7.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
