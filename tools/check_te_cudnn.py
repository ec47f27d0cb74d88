#!/usr/bin/env python
"""Which kernel torch's SDPA runs for MLA's attention (192-wide query/key heads, 128-wide
values, causal, bf16) with and without Transformer Engine imported, and which cuDNN torch sees.

    python3 tools/check_te_cudnn.py none        # torch alone
    python3 tools/check_te_cudnn.py te          # transformer_engine.pytorch imported first
    python3 tools/check_te_cudnn.py megamoe     # imported through megamoe.extensions.te.import_te

Measured on the H200 machine (2026-12-03, torch 2.11.0+cu130 with its cuDNN 9.19, TE 2.20.2):
``none`` runs cuDNN's flash kernels; ``te`` fails with "cuDNN version incompatibility: PyTorch
was compiled against (9, 19, 0) but found runtime version (9, 14, 0)": TE's import loads the
system's cuDNN (/lib/x86_64-linux-gnu, 9.14) before torch loads its own, and in training torch
then drops its cuDNN attention for the memory-efficient kernel (8x slower backward on the
V2-Lite proxy). Pointing TE at torch's cuDNN directory with CUDNN_PATH alone is not enough (the
system's libcudnn_heuristic.so.9 is still picked up: an undefined-symbol error).
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
    if mode == "te":
        import transformer_engine.pytorch  # noqa: F401
    elif mode == "megamoe":
        from megamoe.extensions.te import import_te

        import_te()
    q = torch.randn(8, 16, 4096, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn(8, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.07).sum().backward()

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    top = [e.key[:60] for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)][:2]
    print(mode, "cudnn", torch.backends.cudnn.version(), "CUDNN_PATH", os.environ.get("CUDNN_PATH"), top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
