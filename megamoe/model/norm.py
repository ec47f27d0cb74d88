"""RMSNorm, computed in (at least) float32 whatever the activation dtype."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.numerics import upcast


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``.

    ``sequence_parallel`` marks the weight as replicated over TP but fed by sequence-sharded
    activations, so its gradient is summed over TP before the optimizer step.
    """

    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.weight.sequence_parallel = sequence_parallel

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(upcast(x), (self.dim,), upcast(self.weight), self.eps)
        return y.to(x.dtype)
