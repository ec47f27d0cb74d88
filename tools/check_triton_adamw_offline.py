#!/usr/bin/env python
"""Check ``megamoe/kernels/adamw.py`` on a machine without a GPU, where only Triton is needed
(the CPU build of torch has none: ``pip install triton`` into a scratch environment first).

1. ``compile``: compile every variant of the kernel for Hopper (sm_90) with Triton's own
   compiler, and count its global loads and stores by width. The aligned variants must move 16
   bytes per instruction (``v4.b32``); the unaligned ones fall back to 4- and 2-byte ones.
2. ``interpret``: run :class:`TritonAdamW` under Triton's interpreter (``TRITON_INTERPRET=1``,
   set by this script) on CPU tensors against torch's single-tensor AdamW, with small chunks so
   every tensor spans several table rows, over four steps with and without a ``grad_scale``;
   then with the moments in bf16, against :class:`MomentsAdamW` (torch ops, bf16 moments).
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
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = {"table": "*i64", "bases": "*i64", "step_ptr": "*fp32", "scale_ptr": "*fp32",
                 "found_inf_ptr": "*fp32", **{name: "fp32" for name in (
        "lr", "weight_decay", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps")}}
    ok = True
    variants = [(copy_code, aligned, tl.float32, tl.float32) for copy_code in (0, 1, 2, 3) for aligned in (True, False)]
    variants += [(1, aligned, tl.bfloat16, tl.float32) for aligned in (True, False)]  # bf16 moments
    variants += [(1, aligned, tl.bfloat16, tl.bfloat16) for aligned in (True, False)]  # and bf16 gradients
    for copy_code, aligned, moments, grads in variants:
        constants = {"HAS_SCALE": True, "HAS_FOUND_INF": True, "COPY": copy_code, "GRAD": grads, "EXP_AVG": moments, "EXP_AVG_SQ": moments,
                     "ALIGNED": aligned, "BLOCK": adamw.BLOCK, "CHUNK": adamw.CHUNK}
        source = ASTSource(fn=adamw._adamw_chunks, signature={**signature, **{k: "constexpr" for k in constants}},
                           constexprs=constants)
        ptx = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        widths = collections.Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+", ptx))
        vector = sum(n for op, n in widths.items() if ".v4." in op)
        ok &= (vector > 0) == aligned
        print(f"copy {copy_code} moments {moments} grads {grads} aligned {aligned!s:5}: {dict(widths)}")
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
    return worst < 2e-6 and check_interpret_bf16_grads(shapes) and check_interpret_bf16_moments(shapes)


def check_interpret_bf16_grads(shapes) -> bool:
    """bf16 gradients, new tensors every step (the table's addresses of them are re-uploaded),
    read and widened: the reference gets the same values in float32, so the weights agree as
    closely as with float32 gradients. One step has NaN gradients and ``found_inf``: it must
    change nothing (a NaN read would spread to every weight), its step count included."""
    masters = [torch.randn(s) for s in shapes]
    worst = 0.0
    for opt, _, ref in steps_against_torch(masters, {}, grad_dtype=torch.bfloat16, skip_at=2):
        # nan_to_num: Python's max would pass over a NaN
        worst = max(worst, *(torch.nan_to_num((m - r).abs().max(), nan=float("inf")).item()
                             for m, r in zip(masters, ref)))
    counts = {int(opt.state[m]["step"]) for m in masters}
    print(f"interpret, bf16 gradients, step 2 of 4 skipped (found_inf): largest difference from torch's AdamW "
          f"over the 3 taken: {worst:.2e}; step counts {counts}")
    return worst < 2e-6 and counts == {3}


def check_interpret_bf16_moments(shapes) -> bool:
    """bf16 moments: the interpreter's toward-zero rounding against torch's to-nearest leaves the
    moments a bf16 step apart at most, and the weights within a few 1e-4 after 4 steps of
    ~1e-2 (a wrong bias correction or a moment read as float32 is off by far more)."""
    bf16 = (torch.bfloat16, torch.bfloat16)
    masters = [torch.randn(s) for s in shapes]
    worst_weight = worst_moment = 0.0
    for opt, ref_opt, ref in steps_against_torch(masters, {}, moment_dtypes=bf16):
        for m, r in zip(masters, ref):
            worst_weight = max(worst_weight, (m - r).abs().max().item())
            for key in ("exp_avg", "exp_avg_sq"):
                got, want = opt.state[m][key], ref_opt.state[r][key]
                assert got.dtype == want.dtype == torch.bfloat16, (key, got.dtype)
                # in bf16 steps of the tensor's largest moment: the two roundings part the moments
                # by a step of the previous value, which the next update carries on (also into a
                # moment that cancels to near zero)
                steps = (got.float() - want.float()).abs().max() / (want.float().abs().max() * 2 ** -7)
                worst_moment = max(worst_moment, steps.item())
    print(f"interpret, bf16 moments: largest weight difference {worst_weight:.2e}, moments {worst_moment:.2f} bf16 "
          "steps of the largest")
    return worst_weight < 5e-4 and worst_moment <= 2.0


def main() -> int:
    ok = (check_compile if MODE == "compile" else check_interpret)()
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
