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
from megamoe.model.norm import RMSNorm
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, RNGStatesTracker


class TransformerBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h))`` (DeepSeek names)."""

    def __init__(
        self,
        attn: Union[MultiHeadLatentAttention, GroupedQueryAttention],
        ffn: Union[MLP, MoELayer],
        hidden_size: int,
        norm_eps: float,
        sequence_parallel: bool,
        hidden_dropout: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(hidden_size, norm_eps, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.attn = attn
        self.ffn_norm = RMSNorm(hidden_size, norm_eps, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.ffn = ffn
        self.sequence_parallel = sequence_parallel
        self.hidden_dropout = hidden_dropout

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
        # MoE layers order their tokens by position for capacity decisions
        out = self.ffn(self.ffn_norm(h), positions) if isinstance(self.ffn, MoELayer) else self.ffn(self.ffn_norm(h))
        stats = None
        if isinstance(out, tuple):
            out, stats = out
        return h + self._dropout(out, rng_tracker), stats
