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
from megamoe.parallel.pieces import Piece
from megamoe.parallel.expert_parallel import AllToAllDispatcher
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, RNGStatesTracker, recompute_with_rng


class TransformerBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h))`` (DeepSeek names).

    ``recompute_ffn``: recompute the FFN in backward instead of keeping its activations: a MoE
    layer's (``--moe-layer-recompute``) or a dense MLP's (``--recompute-modules mlp``).
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

    def _attention(self, x: torch.Tensor, positions: torch.Tensor,
                   rng_tracker: Optional[RNGStatesTracker]) -> torch.Tensor:
        """``h = x + attn(attn_norm(x))``: the residual stream after the attention half."""
        return x + self._dropout(self.attn(self.attn_norm(x), positions, rng_tracker), rng_tracker)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                rng_tracker: Optional[RNGStatesTracker] = None) -> tuple[torch.Tensor, Optional[MoEStats]]:
        h = self._attention(x, positions, rng_tracker)
        if not isinstance(self.ffn, MoELayer):
            if self.recompute_ffn and self.training:
                out = recompute_with_rng(self.ffn, self.ffn_norm(h))
            else:
                out = self.ffn(self.ffn_norm(h))
        elif self.recompute_ffn and self.training:
            out = recompute_with_rng(self.ffn, self.ffn_norm(h), positions, rng_tracker=rng_tracker)
        else:  # MoE layers order their tokens by position for capacity decisions
            out = self.ffn(self.ffn_norm(h), positions)
        stats = None
        if isinstance(out, tuple):
            out, stats = out
        return h + self._dropout(out, rng_tracker), stats

    def pieces(self, name: str, positions: torch.Tensor, rng_tracker: Optional[RNGStatesTracker] = None,
               recompute_whole: bool = False) -> list[Piece]:
        """This block's forward as pieces over the residual stream ``x`` (parallel/pieces.py). A MoE
        layer on the all-to-all dispatcher takes three, cut where its exchanges are in flight:
        attention, routing and the dispatch's start; the experts and the combine's start; the
        combine and the residual. Any other block is one piece. Values are named after the
        layer (``name``); ``{name}.aux`` and ``{name}.z`` are its balancing losses, and
        ``{name}.ctx["stats"]`` its statistics.

        Recompute (``recompute_whole``: full recompute; ``recompute_ffn``: the MoE FFN's) cannot
        replay an exchange that one piece starts and the next one waits for, so inside the
        three pieces it recomputes the compute between the exchanges: the attention half (full
        only), the routed experts' MLP and the shared experts'. The exchanged rows, the router's
        choices and each piece's inputs stay alive; a one-piece block is recomputed whole."""
        recompute_whole = recompute_whole and self.training
        if not (isinstance(self.ffn, MoELayer) and isinstance(self.ffn.dispatcher, AllToAllDispatcher)):
            def whole(x):
                if recompute_whole:
                    out, stats = recompute_with_rng(self, x, positions, rng_tracker, rng_tracker=rng_tracker)
                else:
                    out, stats = self(x, positions, rng_tracker)
                if stats is None:
                    return {"x": out}
                return {"x": out, f"{name}.aux": stats.aux_loss, f"{name}.z": stats.z_loss,
                        f"{name}.ctx": {"stats": MoEStats(stats.aux_loss.detach(), stats.z_loss.detach(),
                                                          stats.tokens_per_expert, stats.num_dropped)}}
            return [Piece(name, ("x",), whole)]

        recompute_mlps = self.training and (recompute_whole or self.recompute_ffn)

        def attention_and_dispatch(x):
            if recompute_whole:
                h = recompute_with_rng(self._attention, x, positions, rng_tracker, rng_tracker=rng_tracker)
            else:
                h = self._attention(x, positions, rng_tracker)
            started = self.ffn.start(self.ffn_norm(h), positions, recompute=recompute_mlps)
            return {f"{name}.h": h, **{f"{name}.{k}": v for k, v in started.items()}}

        def experts(sent, ctx):
            return {f"{name}.{k}": v for k, v in self.ffn.run_experts(sent, ctx).items()}

        def combine(back, probs, shared, h, ctx):
            return {"x": h + self._dropout(self.ffn.finish(back, probs, shared, ctx), rng_tracker)}

        def reads(*names):
            return tuple(f"{name}.{n}" for n in names)

        return [Piece(f"{name}.attention", ("x",), attention_and_dispatch),
                Piece(f"{name}.experts", reads("sent", "ctx"), experts),
                Piece(f"{name}.combine", reads("back", "probs", "shared", "h", "ctx"), combine)]

