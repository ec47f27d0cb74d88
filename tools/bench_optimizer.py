#!/usr/bin/env python
"""The end of a training step on the V2-Lite proxy's parameter shapes (one GPU): the gradient
norm, the clip (a pass over the gradients, or folded into the fused AdamW as its
``grad_scale``), the fused AdamW step over float32 masters, and the copy back into bf16; then
megamoe's Triton AdamW (``megamoe/kernels/adamw.py``), which does the step and the copy in one pass,
with the moments in float32 and in bf16 (``--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16``).

    python tools/bench_optimizer.py              # the proxy's 2.25e9 parameters
    python tools/bench_optimizer.py --scale 0.25
"""

from __future__ import annotations

import argparse
import functools

import torch

from cuda_timing import median_ms

from megamoe.kernels.adamw import TritonAdamW, triton_adamw_available

# (shape, count) of the proxy's parameters: 4 layers of DeepSeek-V2-Lite, 3 of them MoE.
PROXY_SHAPES = [((102400, 2048), 2),              # embedding, head
                ((64, 2816, 2048), 3), ((64, 2048, 1408), 3),  # stacked routed experts (w13, w2)
                ((5632, 2048), 3), ((2048, 2816), 3),          # shared experts
                ((21888, 2048), 1), ((2048, 10944), 1),        # the dense layer's MLP
                ((3072, 2048), 4), ((576, 2048), 4), ((4096, 512), 4), ((2048, 2048), 4),  # MLA
                ((64, 2048), 3), ((2048,), 13), ((512,), 4)]   # routers, norms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="Shrink the first dimension of every shape.")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_optimizer.py needs a CUDA GPU")
    shapes = [(max(1, int(s[0] * args.scale)), *s[1:]) for s, n in PROXY_SHAPES for _ in range(n)]
    masters = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    grads = [torch.randn_like(m) for m in masters]
    params = [m.bfloat16() for m in masters]
    for m, g in zip(masters, grads):
        m.grad = g
    numel = sum(m.numel() for m in masters)
    opt = torch.optim.AdamW(masters, lr=1e-4, weight_decay=0.1, fused=True)
    opt.step()  # the states exist
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    divisor = ((norm + 1e-6) / 1.0).clamp(min=1.0)

    def folded_step():
        opt.grad_scale = divisor
        opt.step()
        opt.grad_scale = None

    rows = [
        ("grad norm (foreach norms)", lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))),
        ("clip pass (foreach mul_)", lambda: torch._foreach_mul_(grads, 1.0)),
        ("AdamW, fused", opt.step),
        ("AdamW, fused, clip as grad_scale", folded_step),
        ("masters -> bf16 params (foreach copy)", lambda: torch._foreach_copy_(params, masters)),
    ]
    if triton_adamw_available(masters):
        # over the same masters and gradients (only the time is of interest): each optimizer
        # holds its own states, and memory stays within an 80 GB card
        def triton_step(opt):
            opt.grad_scale = divisor
            opt.step()
            opt.grad_scale = None

        for name, moments in (("Triton AdamW, clip as grad_scale, + copy", (torch.float32, torch.float32)),
                              ("  the same, bf16 moments", (torch.bfloat16, torch.bfloat16))):
            triton_opt = TritonAdamW(masters, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                     copies=dict(zip(masters, params)), moment_dtypes=moments)
            rows.append((name, functools.partial(triton_step, triton_opt)))
    print(f"{len(masters)} tensors, {numel / 1e9:.2f}e9 parameters (float32 masters, Adam states, gradients)")
    for name, fn in rows:
        print(f"{name:<40}{median_ms(fn, args.iters):>8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
