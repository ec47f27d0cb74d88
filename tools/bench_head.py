#!/usr/bin/env python
"""The output head's three GEMMs per chunk size, and the fused head + loss against torch's
unfused one (bf16, one GPU).

The fused head (``megamoe/parallel/cross_entropy.py``) runs, per chunk of C tokens, the logits
GEMM ``x_CD @ W^T`` (bf16 out), the input-gradient GEMM ``g_CV @ W`` (float32 out) and the
weight-gradient GEMM ``W_grad += g^T @ x`` (float32, accumulated in the epilogue). Their speed
depends on C; memory grows with it (C x V bf16 logits). This prints each GEMM's time summed over
all T tokens and its TFLOP/s, beside the 8192^3 GEMM as the ceiling, then the whole head + loss
(forward + backward) per chunk size with its peak memory.

    python tools/bench_head.py                         # the V2-Lite proxy: T 32768, D 2048, V 102400
    python tools/bench_head.py --chunks 4096 8192
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cuda_timing import median_ms
from megamoe.parallel.cross_entropy import linear_cross_entropy
from megamoe.parallel.state import ParallelState


def gemm_rows(T, D, V, chunks, iters):
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=bf16)
    w = torch.randn(V, D, device=dev, dtype=bf16) * 0.02
    grad_w = torch.zeros(V, D, device=dev, dtype=torch.float32)
    flops = 2 * T * D * V
    rows = []
    for C in chunks:
        n = -(-T // C)
        g = torch.randn(C, V, device=dev, dtype=bf16) * 1e-3
        xc = x[:C]
        cases = {
            "logits x@W^T (bf16)": lambda: xc @ w.t(),
            "dgrad g@W (fp32 out)": lambda: torch.mm(g, w, out_dtype=torch.float32),
            "dgrad g@W (bf16 out)": lambda: g @ w,
            "wgrad += g^T@x (fp32)": lambda: torch.addmm(grad_w, g.t(), xc, out_dtype=torch.float32, out=grad_w),
            "wgrad g^T@x (bf16 out)": lambda: g.t() @ xc,
        }
        for name, fn in cases.items():
            ms = median_ms(fn, iters) * n  # one chunk's time x the chunks of T tokens
            rows.append((C, name, ms, flops / (ms * 1e-3) / 1e12))
        del g
    return rows


def ceiling(iters):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ a, iters)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def head_rows(T, D, V, chunks, iters):
    dev, bf16 = "cuda", torch.bfloat16
    state = ParallelState.single()
    x = torch.randn(T, D, device=dev, dtype=bf16, requires_grad=True)
    w = (torch.randn(V, D, device=dev, dtype=bf16) * 0.02).requires_grad_()
    target = torch.randint(0, V, (T,), device=dev)
    weight = torch.full((T,), 1.0 / T, device=dev)
    flops = 3 * 2 * T * D * V

    def fused(C):
        return lambda: linear_cross_entropy(x, w, target, weight, state.tp, V, C).backward()

    def unfused():
        loss = F.cross_entropy((x @ w.t()).float(), target)
        loss.backward()

    rows = []
    for label, fn in [(f"fused, chunk {C}", fused(C)) for C in chunks] + [("torch unfused (fp32 loss)", unfused)]:
        x.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = median_ms(fn, iters)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows.append((label, ms, flops / (ms * 1e-3) / 1e12, peak))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=102400)
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 4096, 5120, 8192, 16384])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_head.py needs a CUDA GPU")
    T, D, V = args.tokens, args.hidden, args.vocab
    print(f"head GEMMs, T {T} D {D} V {V}, bf16; ceiling 8192^3: {ceiling(args.iters):.0f} TFLOP/s")
    print(f"{'chunk':>6}  {'GEMM':<24}{'ms per T':>9}{'TFLOP/s':>9}")
    for C, name, ms, tf in gemm_rows(T, D, V, args.chunks, args.iters):
        print(f"{C:>6}  {name:<24}{ms:>9.2f}{tf:>9.0f}")
    print(f"\nhead + loss, forward + backward\n{'':<28}{'ms':>8}{'TFLOP/s':>9}{'peak GiB':>10}")
    for label, ms, tf, peak in head_rows(T, D, V, args.chunks, args.iters):
        print(f"{label:<28}{ms:>8.2f}{tf:>9.0f}{peak:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
