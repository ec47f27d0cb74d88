"""RMSNorm and LayerNorm, computed in (at least) float32 whatever the activation dtype.

``build_norm`` picks one by ``--normalization``; every norm of the model (block norms, final
norm, MTP norms, MLA's latent norms, GQA's QK-norms) is built through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.numerics import upcast
from megamoe.parallel.param_spec import ParamSpec, set_spec


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``.

    ``sequence_parallel``: the weight is replicated over TP but fed by sequence-sharded
    activations, so its gradient is summed over TP before the optimizer step (its spec's
    ``grad_partial_over_tp``).
    """

    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("norm", (dim,), grad_partial_over_tp=sequence_parallel))

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(upcast(x), (self.dim,), upcast(self.weight), self.eps)
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """``(x - mean(x)) / std(x) * weight + bias`` (Megatron-LM's default normalisation).

    Both parameters' specs carry ``grad_partial_over_tp`` like RMSNorm's weight.
    """

    def __init__(self, dim: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        for p in (self.weight, self.bias):
            set_spec(p, ParamSpec("norm", (dim,), grad_partial_over_tp=sequence_parallel))

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(upcast(x), (self.dim,), upcast(self.weight), upcast(self.bias), self.eps)
        return y.to(x.dtype)


Norm = RMSNorm | LayerNorm


def build_norm(kind: str, dim: int, eps: float, sequence_parallel: bool = False,
               device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Norm:
    """The norm ``--normalization`` names ('RMSNorm' or 'LayerNorm')."""
    if kind == "RMSNorm":
        return RMSNorm(dim, eps, sequence_parallel, device=device, dtype=dtype)
    if kind == "LayerNorm":
        return LayerNorm(dim, eps, sequence_parallel, device=device, dtype=dtype)
    raise ValueError(f"--normalization {kind}: expected RMSNorm or LayerNorm")
