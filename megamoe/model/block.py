"""One transformer layer: pre-norm attention (MLA or GQA) and a dense MLP or MoE FFN."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.mlp import MLP
from megamoe.model.moe import MoELayer, MoEStats
from megamoe.model.norm import build_norm
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, RNGStatesTracker, recompute_with_rng


class TransformerBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h))`` (DeepSeek names).

    ``recompute_ffn``: recompute a MoE FFN in backward instead of keeping its activations
    (``--moe-layer-recompute``).
    """

    def __init__(
        self,
        attn: Union[MultiHeadLatentAttention, GroupedQueryAttention],
        ffn: Union[MLP, MoELayer],
        hidden_size: int,
        norm_eps: float,
        sequence_parallel: bool,
        hidden_dropout: float = 0.0,
        normalization: str = "RMSNorm",
        recompute_ffn: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        norm = dict(sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.attn_norm = build_norm(normalization, hidden_size, norm_eps, **norm)
        self.attn = attn
        self.ffn_norm = build_norm(normalization, hidden_size, norm_eps, **norm)
        self.ffn = ffn
        self.sequence_parallel = sequence_parallel
        self.hidden_dropout = hidden_dropout
        self.recompute_ffn = recompute_ffn

    def _dropout(self, x: torch.Tensor, rng_tracker: Optional[RNGStatesTracker]) -> torch.Tensor:
        if not (self.hidden_dropout and self.training):
            return x
        # Sequence-parallel activations are shards: draw from the per-TP-rank stream. Replicated
        # ones draw from the default stream, identical on every TP rank.
        fork = rng_tracker.fork(TENSOR_PARALLEL_STREAM) if (self.sequence_parallel and rng_tracker) else contextlib.nullcontext()
        with fork:
            return F.dropout(x, self.hidden_dropout, training=True)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                rng_tracker: Optional[RNGStatesTracker] = None) -> tuple[torch.Tensor, Optional[MoEStats]]:
        h = x + self._dropout(self.attn(self.attn_norm(x), positions, rng_tracker), rng_tracker)
        if not isinstance(self.ffn, MoELayer):
            out = self.ffn(self.ffn_norm(h))
        elif self.recompute_ffn and self.training:
            out = recompute_with_rng(self.ffn, self.ffn_norm(h), positions, rng_tracker=rng_tracker)
        else:  # MoE layers order their tokens by position for capacity decisions
            out = self.ffn(self.ffn_norm(h), positions)
        stats = None
        if isinstance(out, tuple):
            out, stats = out
        return h + self._dropout(out, rng_tracker), stats
