#!/usr/bin/env python
"""Which kernel torch's SDPA runs for MLA's attention (192-wide query/key heads, 128-wide
values, causal, bf16) with and without Transformer Engine imported, and which cuDNN torch sees.

    python3 tools/check_te_cudnn.py none        # torch alone
    python3 tools/check_te_cudnn.py te          # transformer_engine.pytorch imported first
    python3 tools/check_te_cudnn.py megamoe     # imported through megamoe.extensions.te.import_te
    python3 tools/check_te_cudnn.py warm        # torch's cuDNN attention run once, then TE imported

Each line also lists the cuDNN libraries mapped into the process and, where TE was imported,
whether a TE FP8 linear still runs.

Measured on the H200 machine (2026-12-03, torch 2.11.0+cu130 with its cuDNN 9.19, TE 2.20.2):
``none`` runs cuDNN's flash kernels; ``te`` fails with "cuDNN version incompatibility: PyTorch
was compiled against (9, 19, 0) but found runtime version (9, 14, 0)": TE's import loads the
system's cuDNN (/lib/x86_64-linux-gnu, 9.14) before torch loads its own, and in training torch
then drops its cuDNN attention for the memory-efficient kernel (8x slower backward on the
V2-Lite proxy). ``megamoe`` (``import_te`` loads torch's cuDNN libraries first and points TE at
them) runs cuDNN 9.19's flash kernels, and TE's FP8 linear still runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "none"
    q = torch.randn(8, 16, 4096, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn(8, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.07).sum().backward()

    if mode == "warm":
        run()
    if mode in ("te", "warm"):
        import transformer_engine.pytorch  # noqa: F401
    elif mode == "megamoe":
        from megamoe.extensions.te import import_te

        import_te()
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    top = [e.key[:60] for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)][:2]
    print(mode, "cudnn", torch.backends.cudnn.version(), "CUDNN_PATH", os.environ.get("CUDNN_PATH"), top)
    print(mode, "cudnn libraries mapped:", sorted(_mapped("libcudnn")))
    if mode != "none":
        print(mode, "TE FP8 linear:", _te_fp8_linear())
    return 0


def _mapped(prefix: str) -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith(prefix)}


def _te_fp8_linear() -> str:
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    try:
        layer = te.Linear(2048, 2048, bias=False, params_dtype=torch.bfloat16, device="cuda")
        x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with te.autocast(enabled=True, recipe=recipe.Float8BlockScaling()):
            layer(x).sum().backward()
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # the probe reports, it does not stop
        return f"FAILED {type(err).__name__}: {str(err)[:200]}"


if __name__ == "__main__":
    sys.exit(main())
