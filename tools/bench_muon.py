#!/usr/bin/env python
"""Muon and MuonClip on the V2-Lite proxy, one GPU (issue 18's figures in docs/benchmarks.md).

Three measurements, each selected by its flag:

``--curves``: loss curves of AdamW and Muon on the same data in the same order (the demo corpus
of ``examples/quickstart.sh``, prepared on the CPU machine and carried along: ``--data-dir``),
one run per optimizer and learning rate, the same cosine schedule for all; ``--stop N`` ends the
runs after N steps of that schedule (a learning-rate sweep), Megatron's ``--exit-interval``.

``--overhead``: the step time of AdamW alone, with ``--log-max-attention-logit`` (the per-head
max-logit pass), and of Muon with and without ``--qk-clip`` (mock data, sequence 4096).

``--kernel``: the max-logit pass of one attention layer against the attention forward.

``--owners``: the distributed optimizer's Newton-Schulz work per rank at DP 1, 2, 4 and 8: the
proxy's matrices assigned to owners as ``DistributedMuon`` assigns them, and the time of the
most loaded owner's orthogonalisation (batched per weight, as it runs).

    python tools/bench_muon.py --curves --adam-lrs 5e-4 1.5e-3 --muon-lrs 5e-4 1.5e-3 --stop 100
    python tools/bench_muon.py --overhead --owners
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROXY = ["--config", "examples/configs/deepseek_v2_lite.yaml", "--num-layers", "4", "--moe-layer-freq",
         "[0]*1+[1]*3", "--bf16", "--moe-grouped-gemm-impl", "torch", "--eval-iters", "0"]
# Curves: 8 x 1024 tokens a step, 300 steps: about one pass over the demo corpus's 2.4M tokens.
CURVES = ["--seq-length", "1024", "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "300",
          "--lr-warmup-iters", "30", "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
          "--seed", "1234"]
# Muon with Moonlight's scaling: its update's RMS matches AdamW's, so learning rates compare directly.
MUON = ["--optimizer", "muon", "--muon-extra-scale-factor", "0.2"]
OVERHEAD = ["--seq-length", "4096", "--micro-batch-size", "8", "--global-batch-size", "8", "--mock-data",
            "--train-iters", "6", "--lr-warmup-iters", "2"]


def train(flags: list[str], log: Path) -> list[dict]:
    """pretrain_moe.py with ``flags``: its metrics, one dict per step (empty on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        cmd = [sys.executable, str(ROOT / "pretrain_moe.py"), *PROXY, *flags, "--log-interval", "50",
               "--metrics-file", str(metrics)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            print(f"FAILED ({log}):\n{proc.stderr[-2000:]}", flush=True)
            return []
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def curves(args, out: Path) -> None:
    data = ["--data-path", f"{args.data_dir}/shakespeare_text_document", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", f"{args.data_dir}/tokenizer.model"]
    runs = [("adamw", lr, []) for lr in args.adam_lrs] + [("muon", lr, MUON) for lr in args.muon_lrs]
    marks = [m for m in (25, 50, 100, 150, 200, 250, 300) if m <= (args.stop or 300)]
    print(f"\n{'optimizer':<8}{'lr':>9}" + "".join(f"{'loss@' + str(m):>11}" for m in marks)
          + f"{'last 10':>10}{'step s':>9}", flush=True)
    for name, lr, extra in runs:
        flags = [*CURVES, *data, "--lr", str(lr), "--min-lr", str(lr / 10), *extra]
        if args.stop:
            flags += ["--exit-interval", str(args.stop)]
        history = train(flags, out / f"{name}-{lr}.log")
        (out / f"{name}-{lr}.json").write_text(json.dumps([(r["iteration"], r["lm_loss"]) for r in history]))
        if not history:
            continue
        loss = {r["iteration"]: r["lm_loss"] for r in history}
        step = statistics.mean(r["step_time"] for r in history[3:])
        last = statistics.mean(r["lm_loss"] for r in history[-10:])
        print(f"{name:<8}{lr:>9.1e}" + "".join(f"{loss.get(m, float('nan')):>11.4f}" for m in marks)
              + f"{last:>10.4f}{step:>9.3f}", flush=True)


def overhead(out: Path) -> None:
    cases = [("AdamW", []), ("AdamW, --log-max-attention-logit", ["--log-max-attention-logit"]),
             ("Muon", MUON), ("Muon, --qk-clip", [*MUON, "--qk-clip"])]
    print(f"\n{'case':<36}{'step s':>9}{'peak GiB':>10}{'max logit':>11}", flush=True)
    for name, extra in cases:
        history = train([*OVERHEAD, *extra], out / f"overhead-{len(extra)}-{name.split(',')[0]}.log")
        if not history:
            continue
        step = statistics.mean(r["step_time"] for r in history[2:])
        peak = max(r.get("max_memory_allocated_gib", 0.0) for r in history)
        logits = history[-1].get("max_attention_logits")
        shown = f"{max(logits):>11.2f}" if logits else f"{'':>11}"
        print(f"{name:<36}{step:>9.3f}{peak:>10.2f}{shown}", flush=True)


def kernel() -> None:
    """The max-logit pass of one proxy attention layer (MLA: 16 heads, qk 192, micro-batch 8,
    sequence 4096) against the attention forward it shadows."""
    import torch
    import torch.nn.functional as F

    from cuda_timing import median_ms
    from megamoe.kernels.max_logit import chunked_max_logits, max_logits

    b, h, s, d = 8, 16, 4096, 192
    q, k = (torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3) for _ in range(2))
    v = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)  # padded to qk's 192, as the CP core does
    scale = d ** -0.5
    attention = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), 10)
    print(f"\n[b {b}, heads {h}, s {s}, d {d}] bf16: causal attention forward {attention:.2f} ms", flush=True)
    for name, fn in (("max-logit pass (Triton)", max_logits), ("max-logit pass (torch, chunked)", chunked_max_logits)):
        ms = median_ms(lambda: fn(q, k, scale, True), 10)
        print(f"{name:<34}{ms:>8.2f} ms  x{ms / attention:.2f} the forward", flush=True)


def owners() -> None:
    import torch

    from cuda_timing import median_ms
    from megamoe.cli import parse_config
    from megamoe.parallel.state import ParallelState
    from megamoe.training.distributed_muon import Matrix, _assign_owners
    from megamoe.training.muon import is_matrix, newton_schulz_cost, orthogonalized_update
    from megamoe.training.train import meta_model

    config = parse_config([*PROXY, "--seq-length", "4096"])
    state = ParallelState.single()
    params = [p for p in meta_model(config, state).parameters() if is_matrix(p)]
    matrices = [Matrix(p, None, 0, 0, (1,) * (p.ndim - 2) + tuple(p.shape[-2:]))
                for p in params for _ in range(p[..., 0, 0].numel())]
    device = torch.device("cuda")
    print(f"\n{len(matrices)} matrices; the most loaded owner's Newton-Schulz (TF32, 5 steps):")
    print(f"{'DP':>4}{'matrices':>10}{'share of cost':>15}{'ms':>9}{'vs DP 1':>9}", flush=True)
    base = None
    total = sum(newton_schulz_cost(m.param) for m in matrices)
    for dp in (1, 2, 4, 8):
        _assign_owners(matrices, dp)
        load = [sum(newton_schulz_cost(m.param) for m in matrices if m.owner == r) for r in range(dp)]
        busiest = max(range(dp), key=lambda r: load[r])
        mine: dict = {}
        for m in matrices:
            if m.owner == busiest:
                mine.setdefault(m.param, []).append(m)
        batches = [(p, torch.randn(len(ms), *p.shape[-2:], device=device) if p.ndim > 2
                    else torch.randn(*p.shape, device=device)) for p, ms in mine.items()]
        t = config.training

        def run():
            for p, u in batches:
                orthogonalized_update(u, p, state, t)

        ms = median_ms(run, 5)
        base = base or ms
        print(f"{dp:>4}{sum(len(v) for v in mine.values()):>10}{load[busiest] / total:>15.3f}{ms:>9.1f}"
              f"{base / ms:>8.2f}x", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", action="store_true")
    p.add_argument("--adam-lrs", type=float, nargs="*", default=[])
    p.add_argument("--muon-lrs", type=float, nargs="*", default=[])
    p.add_argument("--stop", type=int, default=None, help="End the curves after this many steps (a sweep).")
    p.add_argument("--data-dir", default="runs/demo_data")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--owners", action="store_true")
    p.add_argument("--kernel", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_muon"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        curves(args, out)
    if args.overhead:
        overhead(out)
    if args.owners:
        owners()
    if args.kernel:
        kernel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
