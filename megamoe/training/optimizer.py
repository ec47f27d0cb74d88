"""AdamW with float32 master weights and float32 gradient accumulation.

Model parameters keep the training dtype (bfloat16 or float32). Every backward adds the
parameter's gradient into ``param.main_grad`` (float32) through a post-accumulate hook and
frees ``param.grad``, so micro-batches accumulate in float32 as Megatron does. The optimizer
updates float32 master copies (the parameters themselves in float32 training) and copies the
result back. Norm weights, biases and other 1-D parameters get no weight decay.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megamoe.config import TrainingConfig
from megamoe.numerics import upcast


class MixedPrecisionAdamW:
    """AdamW over float32 masters of ``model``'s parameters (fused kernel on CUDA)."""

    def __init__(self, model: nn.Module, t: TrainingConfig):
        self.params = [p for p in model.parameters() if p.requires_grad]
        # float32 (or float64, in tests) parameters are their own masters
        self.masters_are_params = all(upcast(p).dtype == p.dtype for p in self.params)
        for p in self.params:
            p.main_grad = torch.zeros_like(p, dtype=upcast(p).dtype)
            p.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
        self.masters = self.params if self.masters_are_params else [upcast(p.detach()).clone() for p in self.params]
        decay = [m for p, m in zip(self.params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.ndim < 2]
        fused = self.params[0].is_cuda
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused,
        )

    def zero_grad(self) -> None:
        for p in self.params:
            p.main_grad.zero_()
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, master in zip(self.params, self.masters):
            master.grad = p.main_grad
        self.optimizer.step()
        for p, master in zip(self.params, self.masters):
            master.grad = None
            if master is not p:
                p.copy_(master)


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None
