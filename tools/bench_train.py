#!/usr/bin/env python
"""Benchmark end-to-end training throughput of pretrain_moe.py, one run per expert backend.

Default: the 4-layer DeepSeek-V2-Lite proxy of shared/gpu/README.md (layer 0 dense; 64 experts
top-6, ffn 1408, 2 shared; MLA kv_lora 512; hidden 2048; vocab 102400; seq 4096), bf16 with
float32 master weights, micro-batch 8, on one GPU. Steady state = the mean over iterations after
``--warmup``. Prints tokens/s, TFLOP/s per device (megamoe/training/flops.py) and peak memory.

    python tools/bench_train.py --backends torch te loop
    python tools/bench_train.py --backends torch -- --micro-batch-size 4     # extra pretrain flags
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROXY = ["--config", str(ROOT / "examples/configs/deepseek_v2_lite.yaml"), "--num-layers", "4",
         "--moe-layer-freq", "[0]*1+[1]*3", "--seq-length", "4096", "--micro-batch-size", "8",
         "--global-batch-size", "8", "--bf16", "--eval-iters", "0", "--lr-warmup-iters", "2"]


def run(backend: str, iters: int, extra: list[str], nproc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launcher, str(ROOT / "pretrain_moe.py"), *PROXY, "--moe-grouped-gemm-impl", backend,
               "--train-iters", str(iters), "--log-interval", str(iters), "--metrics-file", str(metrics), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
        print(proc.stdout[-1500:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        if proc.returncode:
            return []
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=["loop", "torch", "te"])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="Iterations left out of the mean.")
    parser.add_argument("--nproc", type=int, default=1)
    args = parser.parse_args(own)
    rows = []
    for backend in args.backends:
        history = run(backend, args.iters, extra, args.nproc)
        steady = history[args.warmup:]
        if not steady:
            rows.append((backend, None))
            continue
        time = sum(r["step_time"] for r in steady) / len(steady)
        rows.append((backend, {
            "step_ms": 1000 * time,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "tflops": sum(r["tflops_per_device"] for r in steady) / len(steady),
            "mem_gib": max(r.get("max_memory_allocated_gib", 0.0) for r in history),
            "loss": history[-1]["lm_loss"],
        }))
    print(f"\n{'backend':<8}{'step (ms)':>11}{'tokens/s':>12}{'TFLOP/s':>10}{'peak GiB':>10}{'final loss':>12}")
    for backend, r in rows:
        if r is None:
            print(f"{backend:<8}  FAILED")
        else:
            print(f"{backend:<8}{r['step_ms']:>11.1f}{r['tokens_per_s']:>12,.0f}{r['tflops']:>10.1f}"
                  f"{r['mem_gib']:>10.1f}{r['loss']:>12.4f}")
    return 0 if all(r is not None for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
