"""Transformer Engine backends. The only module that imports ``transformer_engine``.

``TEGroupedMLP`` runs this rank's experts with two TE ``GroupedLinear`` layers: ``fc1``
holds each expert's ``[w1; w3]`` slice fused ``[2F, D]`` (one grouped GEMM for both; ``w1``
alone, ``[F, D]``, for GeLU experts), ``fc2`` its ``w2`` slice ``[D, F]``. Weights are drawn exactly as the other backends draw them, so all
backends start from the same model, and their specs (set by ``GroupedExperts``) place them in
the same global tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def import_te():
    """``transformer_engine.pytorch``, or an ImportError that says how to get it."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        raise ImportError(
            "the 'te' expert backend needs Transformer Engine: pip install 'megamoe[te]' "
            "(or use --moe-grouped-gemm-impl torch)"
        ) from err
    return te


class TEGroupedMLP(nn.Module):
    """SwiGLU (``gated``) or GeLU experts on TE GroupedLinear; parameters ``fc1.weight{i}``,
    ``fc2.weight{i}``."""

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_local: int, gated: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        te = import_te()
        kw = dict(bias=False, params_dtype=dtype or torch.get_default_dtype(),
                  device=device if device is not None else "cuda")
        self.num_local_experts, self.ffn_local, self.gated = num_local_experts, ffn_local, gated
        self.fc1 = te.GroupedLinear(num_local_experts, hidden_size, (2 if gated else 1) * ffn_local, **kw)
        self.fc2 = te.GroupedLinear(num_local_experts, ffn_local, hidden_size, **kw)
        # GroupedExperts gives each weight its spec: its expert's slice of the global w13 / w2

    def fc1_weight(self, i: int) -> nn.Parameter:
        return getattr(self.fc1, f"weight{i}")

    def fc2_weight(self, i: int) -> nn.Parameter:
        return getattr(self.fc2, f"weight{i}")

    @torch.no_grad()
    def load_expert(self, i: int, w1_FD: torch.Tensor, w3_FD: Optional[torch.Tensor], w2_DF: torch.Tensor) -> None:
        self.fc1_weight(i).copy_(w1_FD if w3_FD is None else torch.cat([w1_FD, w3_FD]))
        self.fc2_weight(i).copy_(w2_DF)

    def stacked(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """This rank's weights (or their main gradients) in the loop backend's stacked layout."""
        pick = (lambda p: p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else (lambda p: p.detach())
        fc1 = torch.stack([pick(self.fc1_weight(i)) for i in range(self.num_local_experts)])
        fc2 = torch.stack([pick(self.fc2_weight(i)) for i in range(self.num_local_experts)])
        if not self.gated:
            return {"w1": fc1, "w2": fc2}
        return {"w1": fc1[:, : self.ffn_local], "w3": fc1[:, self.ffn_local:], "w2": fc2}

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        m_splits = tokens_per_expert.tolist()  # host sync: GroupedLinear takes host split sizes
        h = self.fc1(x_ND, m_splits)
        if self.gated:  # [gate | up] halves, as megamoe.model.experts.activate_fc1
            h1, h3 = h.chunk(2, dim=-1)
            h = F.silu(h1) * h3
        else:
            h = F.gelu(h)
        return self.fc2(h, m_splits)
