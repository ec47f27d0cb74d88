""":class:`~megamoe.kernels.adamw.TritonAdamW` and torch's single-tensor AdamW (with bf16 moments:
:class:`~megamoe.training.moments_adamw.MomentsAdamW`) stepped side by side on the same
gradients: the GPU test (``tests/training/test_optimizer.py``) and the check without a GPU
(``tools/check_triton_adamw_offline.py``) both run these steps and judge them their own way."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megamoe.kernels.adamw import FLOAT32_MOMENTS, TritonAdamW
from megamoe.training.moments_adamw import MomentsAdamW


def steps_against_torch(masters: list[torch.Tensor], copies: dict[torch.Tensor, torch.Tensor], steps: int = 4,
                        moment_dtypes: tuple[torch.dtype, torch.dtype] = FLOAT32_MOMENTS,
                        grad_dtype: torch.dtype = torch.float32, skip_at: Optional[int] = None) -> Iterator[tuple[TritonAdamW, torch.optim.AdamW, list[torch.Tensor]]]:
    """``steps`` steps of a TritonAdamW over ``masters`` (weight decay on ``masters[2:]``, none on
    ``masters[:2]``; ``copies`` as its argument) and of torch's single-tensor AdamW over clones of
    them. Each step draws gradients of scale 5; every other step gives the Triton step a
    ``grad_scale`` and the reference the gradients divided by it. Yields ``(opt, reference,
    reference masters)`` after each step. ``moment_dtypes`` other than float32: both keep the
    moments in them. ``grad_dtype``: the Triton step reads its gradients in it (bf16: a step's own
    gradients, ``megamoe/parallel/data_parallel.py``), the reference their float32 values.
    ``skip_at``: at that step the Triton step gets non-finite gradients and a ``found_inf`` of
    1 (0 at the others) and the reference takes no step: nothing may change."""

    def groups(ts):
        return [{"params": ts[2:], "weight_decay": 0.1}, {"params": ts[:2], "weight_decay": 0.0}]

    ref = [m.clone() for m in masters]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = TritonAdamW(groups(masters), **hyper, copies=copies, moment_dtypes=moment_dtypes)
    if tuple(moment_dtypes) == FLOAT32_MOMENTS:
        ref_opt = torch.optim.AdamW(groups(ref), **hyper, foreach=False, fused=False)
    else:
        ref_opt = MomentsAdamW(groups(ref), **hyper, moment_dtypes=moment_dtypes)
    for step in range(steps):
        scale: Optional[torch.Tensor] = None if step % 2 else torch.tensor(3.0 + step, device=masters[0].device)
        skip = step == skip_at
        if skip_at is not None:
            opt.found_inf = torch.tensor(float(skip), device=masters[0].device)
        for m, r in zip(masters, ref):
            g = (torch.randn_like(m) * (float("nan") if skip else 5)).to(grad_dtype)
            if grad_dtype == m.dtype:
                m.grad = g
            else:
                opt.narrow_grads[id(m)] = g
            r.grad = g.float() / scale if scale is not None else g.to(torch.float32, copy=True)
        opt.grad_scale = scale
        opt.step()
        if not skip:
            ref_opt.step()
        yield opt, ref_opt, ref
