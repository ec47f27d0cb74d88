#!/usr/bin/env python
"""Benchmark the routed experts and one dense linear of DeepSeek-V2-Lite shape in bf16 and in
each native FP8 recipe, forward and forward + backward, on one GPU.

    python tools/bench_fp8.py [--iters 20] [--profile] [--linear-shapes 2048:3072 512:4096 ...] [--no-experts]

Modes: bf16, megamoe's native rowwise and tensorwise recipes, and, when Transformer Engine is
installed, TE's delayed, tensorwise and blockwise recipes (te.GroupedLinear experts, te.Linear).
Shapes: 32,768 tokens (micro-batch 8 x seq 4096) routed top-6 to 64 experts (hidden 2048, ffn
1408, SwiGLU), evenly; the dense linear is MLA's query projection, 2048 -> 3072. Each timed call
first bumps the weights' version, as an optimizer step does, so the FP8 weight quantization is
counted once per call (one micro-batch per step). Reports medians of CUDA-event timings and the
ratio to bf16, and the host's time to issue one forward + backward while the GPU is busy (the
launch overhead; about 50 ms or more would mean a host synchronisation); ``--profile`` adds
each mode's top kernels of one forward + backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.kernels.fp8 import Fp8Recipe  # noqa: E402
from megamoe.kernels.fp8_gemm import Fp8WeightCache, fp8_linear  # noqa: E402
from megamoe.model.experts import GroupedExperts  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from cuda_timing import host_ms, median_ms  # noqa: E402

TOKENS, TOPK, EXPERTS, HIDDEN, FFN, Q_OUT = 32768, 6, 64, 2048, 1408, 3072
MODES = {"bf16": None, "rowwise": Fp8Recipe("hybrid", "rowwise"), "tensorwise": Fp8Recipe("hybrid", "tensorwise")}
TE_MODES = {f"te-{g}": Fp8Recipe("hybrid", g, transformer_engine=True) for g in ("delayed", "tensorwise", "blockwise")}


def _bump(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0)  # a new version: the FP8 caches quantize again, as after an optimizer step


def experts_case(recipe, device):
    backend = "te" if recipe is not None and recipe.transformer_engine else "torch"
    experts = GroupedExperts(EXPERTS, EXPERTS, 0, HIDDEN, FFN, ParallelState.single().etp, backend=backend,
                             fp8=recipe, device=device, dtype=torch.bfloat16)
    experts.init_weights(torch.Generator(device=device).manual_seed(0))
    rows = TOKENS * TOPK
    x = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.full((EXPERTS,), rows // EXPERTS, device=device, dtype=torch.int64)
    dy = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
    params = list(experts.parameters())
    return params, (lambda: experts(x, counts)), dy


def linear_case(recipe, device, shape=(HIDDEN, Q_OUT)):
    fan_in, fan_out = shape
    w = torch.nn.Parameter(torch.randn(fan_out, fan_in, device=device, dtype=torch.bfloat16) * 0.02)
    x = torch.randn(TOKENS, fan_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, fan_out, device=device, dtype=torch.bfloat16)
    cache = Fp8WeightCache()
    if recipe is None:
        return [w], (lambda: F.linear(x, w)), dy
    if recipe.transformer_engine:
        from megamoe.extensions.te import TELinearGemm

        te_gemm = TELinearGemm(recipe, None)
        return [w], (lambda: te_gemm(x, w)), dy
    return [w], (lambda: fp8_linear(x, w, recipe, cache)), dy


def measure(case, recipe, device, iters):
    params, forward, dy = case(recipe, device)

    def fwd():
        _bump(params)
        with torch.no_grad():
            forward()

    def fwd_bwd():
        _bump(params)
        forward().backward(dy)
        for p in params:
            p.grad = None

    return params, fwd_bwd, median_ms(fwd, iters), median_ms(fwd_bwd, iters), host_ms(fwd_bwd, iters)


def top_kernels(fn, n=10) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--linear-shapes", nargs="+", default=[f"{HIDDEN}:{Q_OUT}"], metavar="IN:OUT",
                        help="Dense linears to time (default: MLA's query projection).")
    parser.add_argument("--no-experts", action="store_true", help="Time the dense linears only.")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':<18}{'mode':<15}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd x':>8}{'fwd+bwd x':>11}{'host ms':>9}")
    modes = dict(MODES)
    try:
        import transformer_engine.pytorch  # noqa: F401

        modes.update(TE_MODES)
    except ImportError:
        print("Transformer Engine is not installed: its modes are left out")
    cases = [] if args.no_experts else [("experts", experts_case)]
    for spec in args.linear_shapes:
        shape = tuple(int(n) for n in spec.split(":"))
        cases.append((f"linear {spec}" if len(args.linear_shapes) > 1 else "linear",
                      lambda recipe, device, shape=shape: linear_case(recipe, device, shape)))
    for name, case in cases:
        base = None
        for mode, recipe in modes.items():
            _, fwd_bwd, f, fb, host = measure(case, recipe, device, args.iters)
            base = base or (f, fb)
            print(f"{name:<18}{mode:<15}{f:9.2f}{fb:12.2f}{base[0] / f:8.2f}{base[1] / fb:11.2f}{host:9.2f}",
                  flush=True)
            if args.profile:
                print(top_kernels(fwd_bwd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
