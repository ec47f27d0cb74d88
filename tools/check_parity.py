#!/usr/bin/env python
"""Run one training job under several parallel layouts and compare them iteration by iteration.

Each layout is launched with torchrun (gloo on CPU, NCCL on GPUs) on the same model, seed and
data; the per-iteration lm loss and grad norm of every layout are compared with the first
layout's, and the tool exits 1 when any relative difference exceeds ``--rtol``.

    python tools/check_parity.py                       # TP 1 / 2 / 2+SP / 4; MLA, GQA, dense; 3 iterations
    python tools/check_parity.py --models mla --layouts tp=1 tp=2,sp -- --bf16

A layout is comma-separated ``key=value`` items: tp, pp, cp, ep, etp, dp (extra data-parallel
replicas), vpp, dispatcher, bucket (``--ddp-bucket-size``); switches alone: ``sp`` (sequence
parallel), ``distopt`` (distributed optimizer), ``overlap`` (overlapped gradient reduction),
``gather`` (overlapped parameter all-gather). The world size is
``tp * pp * cp * dp``. Every run uses micro-batch 2 and global batch 8 (so up to 4 data-parallel
ranks fit); arguments after ``--`` go to every run of ``pretrain_moe.py`` and override them.

``A>B`` (e.g. ``tp=2,sp>ep=2,distopt``) checks a checkpoint across layouts: layout A trains
``--resume-at`` iterations and saves, layout B loads the checkpoint and trains the rest; the
joined iterations are compared like any layout's.

    python tools/check_parity.py --models mla --layouts tp=1 "tp=2,sp>pp=2" "ep=2,dp=2>tp=1"
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

DEMO = ["--config", str(ROOT / "examples" / "configs" / "demo.yaml")]
MODELS = {
    # The quick start's tiny DeepSeek-V3-style model: MLA, shared + routed experts, sigmoid router with bias.
    "mla": DEMO,
    # GQA (8 heads, 4 key/value heads) with a softmax router and the micro-batch aux loss.
    "gqa": DEMO + ["--no-multi-latent-attention", "--no-qk-layernorm", "--num-attention-heads", "8",
                   "--group-query-attention", "--num-query-groups", "4", "--moe-router-score-function", "softmax",
                   "--no-moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "aux_loss",
                   "--moe-aux-loss-coeff", "1e-2"],
    # The bare run: Megatron-LM's default dense GPT (LayerNorm, GeLU, tied head), without dropout,
    # whose masks differ between layouts by design.
    "dense": ["--attention-dropout", "0", "--hidden-dropout", "0"],
}
DEFAULT_LAYOUTS = ["tp=1", "tp=2", "tp=2,sp", "tp=4"]
FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "vpp": "--virtual-pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "cp_comm": "--cp-comm-type",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "dispatcher": "--moe-token-dispatcher-type",
    "bucket": "--ddp-bucket-size",
    "schedule": "--pipeline-schedule",
    "recompute": "--recompute-granularity",
}
SWITCHES = {
    "sp": "--sequence-parallel",
    "distopt": "--use-distributed-optimizer",
    "overlap": "--overlap-grad-reduce",
    "gather": "--overlap-param-gather",
    "moe_overlap": "--overlap-moe-expert-parallel-comm",
    "delay_wgrad": "--delay-wgrad-compute",
}


def layout_args(layout: str) -> tuple[list[str], int]:
    """(pretrain flags, world size) for a layout string such as 'tp=2,sp,ep=2'."""
    if ">" in layout:  # A>B: each must be valid
        for part in layout.split(">", 1):
            layout_args(part)
        return [], 0
    flags, degrees = [], {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
    for item in filter(None, layout.split(",")):
        key, _, value = item.partition("=")
        if key in SWITCHES and not value:
            flags.append(SWITCHES[key])
        elif key == "dp":
            degrees["dp"] = int(value)
        elif key in FLAGS and value:
            flags += [FLAGS[key], value]
            if key in degrees:
                degrees[key] = int(value)
        else:
            raise SystemExit(f"check_parity.py: error: bad layout item '{item}' in '{layout}' "
                             f"(use {', '.join(FLAGS)}, dp=N or one of {', '.join(SWITCHES)})")
    return flags, degrees["tp"] * degrees["pp"] * degrees["cp"] * degrees["dp"]


def run_layout(layout: str, model_args: list[str], extra: list[str], iters: int, workdir: Path,
               resume_at: int = 1) -> list[dict]:
    if ">" in layout:  # save in the first layout, resume in the second
        first, second = layout.split(">")
        ckpt = workdir / f"ckpt_{abs(hash((layout, tuple(model_args))))}"
        rows = run_layout(first, model_args, extra + ["--save", str(ckpt)], resume_at, workdir)
        return rows + run_layout(second, model_args, extra + ["--load", str(ckpt)], iters, workdir)
    flags, world = layout_args(layout)
    metrics = workdir / f"{abs(hash((layout, tuple(model_args), tuple(extra))))}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(ROOT / "pretrain_moe.py"), *model_args, *flags, "--train-iters", str(iters), "--log-interval", "1",
           "--eval-iters", "0", "--lr-warmup-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
           "--metrics-file", str(metrics), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [line for line in lines if "error:" in line or "Error" in line][:5]
        tail = "\n".join(errors or lines[-25:])
        raise RuntimeError(f"layout {layout} failed (exit {proc.returncode}):\n{tail}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="check_parity.py")
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, help="Layouts; the first is the reference.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="Model variants.")
    parser.add_argument("--iters", type=int, default=3, help="Training iterations per run (default: 3).")
    parser.add_argument("--rtol", type=float, default=1e-4, help="Largest relative difference allowed (default: 1e-4).")
    parser.add_argument("--resume-at", type=int, default=1,
                        help="For A>B layouts: the iteration A saves at and B resumes from (default: 1).")
    args = parser.parse_args(own)
    for layout in args.layouts:
        layout_args(layout)  # fail fast on a bad layout string
        if ">" in layout and not 0 < args.resume_at < args.iters:
            raise SystemExit(f"check_parity.py: error: --resume-at {args.resume_at} must be in 1 .. --iters - 1 "
                             f"({args.iters - 1}) for {layout}")

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            print(f"\nmodel {model}: {' '.join(MODELS[model] + extra) or '(defaults)'}")
            print(f"{'layout':<24}{'iter':>5}{'lm loss':>16}{'rel diff':>11}{'grad norm':>14}{'rel diff':>11}")
            reference = None
            for layout in args.layouts:
                try:
                    rows = run_layout(layout, MODELS[model], extra, args.iters, Path(tmp), args.resume_at)
                except RuntimeError as err:
                    print(f"{layout:<24} FAILED\n{err}")
                    failed = True
                    continue
                reference = reference or rows
                for row, ref in zip(rows, reference):
                    dl, dg = rel(row["lm_loss"], ref["lm_loss"]), rel(row["grad_norm"], ref["grad_norm"])
                    bad = max(dl, dg) > args.rtol
                    failed |= bad
                    print(f"{layout:<24}{row['iteration']:>5}{row['lm_loss']:>16.8f}{dl:>11.2e}"
                          f"{row['grad_norm']:>14.8f}{dg:>11.2e}{'  <-- DRIFT' if bad else ''}")
                if len(rows) != len(reference):
                    print(f"{layout:<24} ran {len(rows)} iterations, reference {len(reference)}")
                    failed = True
    print(f"\n{'FAIL' if failed else 'PASS'}: every layout within rtol {args.rtol:g} of {args.layouts[0]}"
          if not failed else f"\nFAIL: a layout drifted past rtol {args.rtol:g} (or failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
