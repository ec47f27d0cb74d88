#!/usr/bin/env python
"""Check ``megamoe/kernels/adamw.py`` on a machine without a GPU, where only Triton is needed
(the CPU build of torch has none: ``pip install triton`` into a scratch environment first).

1. ``compile``: compile every variant of the kernel for Hopper (sm_90) with Triton's own
   compiler, and count its global loads and stores by width. The aligned variants must move 16
   bytes per instruction (``v4.b32``); the unaligned ones fall back to 4- and 2-byte ones.
2. ``interpret``: run :class:`TritonAdamW` under Triton's interpreter (``TRITON_INTERPRET=1``,
   set by this script) on CPU tensors against torch's single-tensor AdamW, with small chunks so
   every tensor spans several table rows, over four steps with and without a ``grad_scale``.
   The interpreter rounds float32 to bf16 toward zero (the GPU rounds to nearest), so the bf16
   copies are checked to within one bf16 step here; the GPU test checks them exactly.

    python tools/check_triton_adamw_offline.py compile
    python tools/check_triton_adamw_offline.py interpret
"""

from __future__ import annotations

import collections
import os
import re
import sys
from pathlib import Path

MODE = sys.argv[1] if len(sys.argv) == 2 and sys.argv[1] in ("compile", "interpret") else None
if MODE is None:
    raise SystemExit("usage: check_triton_adamw_offline.py compile|interpret")
# the interpreter must be chosen before the kernel is decorated, that is before the import below
os.environ["TRITON_INTERPRET"] = "1" if MODE == "interpret" else "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megamoe.kernels import adamw  # noqa: E402
from megamoe.testing.adamw_steps import steps_against_torch  # noqa: E402


def check_compile() -> bool:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = {"table": "*i64", "step_ptr": "*fp32", "scale_ptr": "*fp32", **{name: "fp32" for name in (
        "lr", "weight_decay", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps")}}
    ok = True
    for copy_code in (0, 1, 2, 3):
        for aligned in (True, False):
            constants = {"HAS_SCALE": True, "COPY": copy_code, "ALIGNED": aligned, "BLOCK": adamw.BLOCK,
                         "CHUNK": adamw.CHUNK}
            source = ASTSource(fn=adamw._adamw_chunks, signature={**signature, **{k: "constexpr" for k in constants}},
                               constexprs=constants)
            ptx = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
            widths = collections.Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+", ptx))
            vector = sum(n for op, n in widths.items() if ".v4." in op)
            ok &= (vector > 0) == aligned
            print(f"copy {copy_code} aligned {aligned!s:5}: {dict(widths)}")
    return ok


def check_interpret() -> bool:
    adamw.BLOCK, adamw.CHUNK = 64, 256
    torch.manual_seed(0)
    shapes = [(3, 5), (adamw.CHUNK + 7,), (3, 256), (64, 64)]
    masters = [torch.randn(s) for s in shapes]
    copies = {masters[0]: torch.zeros(shapes[0], dtype=torch.bfloat16),
              masters[2]: torch.zeros(shapes[2], dtype=torch.float16), masters[3]: torch.zeros(shapes[3])}
    worst = 0.0
    for _, _, ref in steps_against_torch(masters, copies):
        worst = max(worst, *((m - r).abs().max().item() for m, r in zip(masters, ref)))
        for m, c in copies.items():
            step_of_dtype = torch.finfo(c.dtype).eps * m.abs()
            assert bool(((c.float() - m).abs() <= step_of_dtype).all()), c.dtype
    # float32 rounding in another order: a few 1e-7 on weights of magnitude ~1; a wrong bias
    # correction, decay or scale would show as ~1e-3 (an update is ~lr = 1e-2)
    print(f"interpret: largest difference from torch's AdamW over 4 steps: {worst:.2e} (weights ~1, lr 1e-2)")
    return worst < 2e-6


def main() -> int:
    ok = (check_compile if MODE == "compile" else check_interpret)()
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
