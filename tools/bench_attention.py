#!/usr/bin/env python
"""MLA's attention core on every SDPA backend (forward + backward, bf16, causal), against the
backend torch picks by itself (what megamoe runs).

MLA's query/key heads are wider than its value heads (qk 128 + rope 64 = 192, v 128). FLASH
needs equal widths, so it runs with v zero-padded to 192 (exact: the padding's outputs are
dropped). Each backend's output and gradients are checked against the float32 math backend.

    python tools/bench_attention.py                     # the V2-Lite proxy: mbs 8, seq 4096, 16 heads
    python tools/bench_attention.py --batch 16 --seq 8192
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import median_ms

BACKENDS = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash (v padded)": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def run(q, k, v, backend, scale):
    pad = backend == SDPBackend.FLASH_ATTENTION and v.shape[-1] != q.shape[-1]
    vv = F.pad(v, (0, q.shape[-1] - v.shape[-1])) if pad else v
    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
    return out[..., : v.shape[-1]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--qk", type=int, default=192)
    p.add_argument("--v", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.seq)
    q, k = (torch.randn(*shape, args.qk, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(*shape, args.v, device="cuda", generator=g, dtype=torch.bfloat16)
    grad = torch.randn(*shape, args.v, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = args.qk ** -0.5

    def with_grads(backend, dtype=torch.bfloat16):
        qi, ki, vi = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = run(qi, ki, vi, backend, scale)
        out.backward(grad.to(dtype))
        return out.float(), qi.grad.float(), ki.grad.float(), vi.grad.float()

    with sdpa_kernel([SDPBackend.MATH]):
        reference = with_grads(SDPBackend.MATH, torch.float32) if args.seq <= 4096 else None
    print(f"MLA attention core, batch {args.batch} x {args.heads} heads x seq {args.seq}, qk {args.qk}, v {args.v}, "
          "bf16, causal, fwd+bwd")
    print(f"{'backend':<20}{'ms':>9}   max error vs float32 (out, dq, dk, dv)")
    for name, backend in BACKENDS.items():
        try:
            got = with_grads(backend)
            ms = median_ms(lambda: with_grads(backend), args.iters)
        except RuntimeError as err:
            print(f"{name:<20}{'n/a':>9}   {str(err).splitlines()[0][:70]}")
            continue
        errors = "" if reference is None else ", ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(got, reference))
        print(f"{name:<20}{ms:>9.2f}   {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
