"""AdamW with its moments kept in another dtype than the masters (bf16), in plain torch ops.

``--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16`` (Megatron-LM's
flags; DeepSeek-V3 trained with its moments in BF16) halve Adam's 8 bytes per parameter. On CUDA
with Triton the step is :class:`~megamoe.kernels.adamw.TritonAdamW`'s kernel; this class is the
same arithmetic anywhere else (the CPU tests, a GPU without Triton): per tensor, the moments are
widened to the masters' dtype, updated in torch's AdamW order (its single-tensor path), used
unrounded for this step's update, and stored rounded to nearest, as the kernel does.
"""

from __future__ import annotations

import torch

from megamoe.kernels.adamw import new_adam_state


class MomentsAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``exp_avg`` and ``exp_avg_sq`` are ``moment_dtypes``. With the
    masters' own dtype for both it computes what torch's single-tensor AdamW computes, bit for bit."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 moment_dtypes: tuple[torch.dtype, torch.dtype] = (torch.bfloat16, torch.bfloat16)):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.moment_dtypes = tuple(moment_dtypes)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MomentsAdamW takes no closure"
        for group in self.param_groups:
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for master in group["params"]:
                if master.grad is None:
                    continue
                state = self.state[master]
                if not state:
                    state.update(new_adam_state(master, "cpu", self.moment_dtypes))
                state["step"] += 1
                step = state["step"].item()
                grad = master.grad
                exp_avg = state["exp_avg"].to(master.dtype).lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].to(master.dtype).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                master.mul_(1 - lr * weight_decay)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
                master.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
