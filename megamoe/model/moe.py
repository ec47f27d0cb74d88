"""The MoE layer: route -> dispatch -> experts -> combine, plus shared experts.

Shape legend: S sequence positions on this rank, B sequences, T = S*B tokens on this rank,
D hidden, K experts per token, E experts, N dispatched rows (token copies) on this rank.

Token ownership: inside the layer every rank of the TP group works on a different slice of the
sequence. With sequence parallel that is already the case; without it the replicated input is
sliced on entry and the output all-gathered on exit. So the router's gradients are partial
sums over TP (``weight.sequence_parallel``) and expert gradients are partial sums over
expert-DP, whatever the layout. With context parallelism the micro-batch's tokens are spread
over TP x CP: the router's statistics (``token_group``) cover all of them, so the balancing
losses, sequence-level ones included, see whole sequences.

Dispatch: ``megamoe/parallel/expert_parallel.py`` (all-gather or all-to-all, chosen by
``--moe-token-dispatcher-type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from megamoe.model.experts import GroupedExperts
from megamoe.model.mlp import MLP
from megamoe.model.router import Routing, TopKRouter
from megamoe.parallel import mappings
from megamoe.parallel.expert_parallel import AllGatherDispatcher, AllToAllDispatcher, DispatchHandle
from megamoe.parallel.permutation import combine_rows
from megamoe.parallel.random import recompute_with_rng
from megamoe.parallel.state import Group


@dataclass
class MoEStats:
    """Per-layer, per-micro-batch numbers for the loss, the bias update and the logs."""

    aux_loss: torch.Tensor  # this rank's share of the balancing loss (differentiable)
    z_loss: torch.Tensor  # this rank's share of the z-loss (differentiable)
    tokens_per_expert: torch.Tensor  # assignments over the micro-batch (detached, float32)
    num_dropped: torch.Tensor  # pairs dropped over the micro-batch


class MoELayer(nn.Module):
    """Router (``gate``), routed experts (``experts``) and optional ``shared_experts``."""

    def __init__(
        self,
        router: TopKRouter,
        experts: GroupedExperts,
        shared_experts: Optional[MLP],
        dispatcher: Union[AllGatherDispatcher, AllToAllDispatcher],
        tp: Group,
        dp: Optional[Group] = None,
        sequence_parallel: bool = False,
        shared_expert_overlap: bool = True,
        token_group: Optional[Group] = None,
    ):
        super().__init__()
        self.gate, self.experts, self.shared_experts = router, experts, shared_experts
        self.dispatcher = dispatcher
        self.tp, self.dp = tp, dp
        self.token_group = token_group or tp  # the ranks sharing one micro-batch's tokens
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.shared_expert_overlap = shared_expert_overlap
        self.recompute_shared_experts = False  # --recompute-modules shared_experts (the model sets it)
        self._side_stream: Optional[torch.cuda.Stream] = None

    # ----------------------------------------------------------------------------- stages

    def route(self, x_SBD: torch.Tensor, positions_S: Optional[torch.Tensor] = None) -> Routing:
        order_T = None
        if positions_S is not None and self.gate.capacity_factor is not None and self.token_group.size > 1:
            B = x_SBD.shape[1]
            order_T = (positions_S[:, None] * B + torch.arange(B, device=positions_S.device)).reshape(-1)
        return self.gate(x_SBD.reshape(-1, x_SBD.shape[-1]), x_SBD.shape[1], self.token_group, self.dp, order_T)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        return self.dispatcher.dispatch(x_TD, routing.probs_TK, routing.experts_TK, routing.kept_TK,
                                        routing.capacity)

    def combine(self, y_ND: torch.Tensor, handle: DispatchHandle, dtype: torch.dtype) -> torch.Tensor:
        return self.dispatcher.combine(y_ND, handle).to(dtype)

    def _experts_in_chunks(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dispatch, experts and combine chunk by chunk (``--moe-a2a-overlap-chunks``): every
        chunk's exchange is started first; each chunk's experts then run while the later chunks'
        rows travel, and each chunk's outputs travel back while the next chunk computes. In
        backward autograd meets the same pieces in reverse, with the same overlap."""
        sent = self.dispatcher.dispatch_chunks(x_TD, routing.probs_TK, routing.experts_TK, routing.kept_TK,
                                               routing.capacity)
        returning = []
        for pending, handle in sent:
            y_ND = self.experts(self.dispatcher.receive(pending, handle), handle.tokens_per_expert)
            returning.append((self.dispatcher.start_combine(y_ND, handle), handle))
        return torch.cat([self.dispatcher.finish_combine(pending, handle) for pending, handle in returning])

    # ----------------------------------------------------------------------------- split forward

    def start(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, recompute: bool = False) -> dict:
        """The forward's first piece (parallel/pieces.py): the shared experts start, the tokens are
        routed and permuted and their exchange starts. Returns the tensors the later pieces read
        (``sent``: the rows in flight; ``probs``; ``shared``), the scalar losses (``aux``, ``z``),
        and ``ctx`` (what is not differentiated: the handle, the exchange, the statistics).
        ``recompute``: the shared and the routed experts' MLPs recompute their activations in
        backward (the exchanges around them are not repeated)."""
        shared = self._shared_start(x, recompute)
        x_own, positions, tokens_sharded = self._own_tokens(x, positions)
        routing = self.route(x_own, positions)
        ((pending, handle),) = self.dispatcher.dispatch_chunks(x_own.reshape(-1, x_own.shape[-1]), routing.probs_TK,
                                                               routing.experts_TK, routing.kept_TK, routing.capacity)
        stats = MoEStats(routing.aux_loss.detach(), routing.z_loss.detach(), routing.tokens_per_expert_E,
                         routing.num_dropped)
        stream, shared = shared if isinstance(shared, tuple) else (None, shared)
        ctx = dict(handle=handle, exchange=pending.exchange, shape=x_own.shape, dtype=x.dtype,
                   gather=not tokens_sharded, stream=stream, stats=stats, recompute=recompute)
        return dict(sent=pending.out, probs=routing.probs_TK, shared=shared, aux=routing.aux_loss,
                    z=routing.z_loss, ctx=ctx)

    def run_experts(self, sent: torch.Tensor, ctx: dict) -> dict:
        """The second piece: the rows arrive, the experts run, their outputs start back."""
        handle = ctx["handle"]
        rows = self.dispatcher.receive(mappings.PendingAllToAll(sent, ctx["exchange"]), handle)
        if ctx["recompute"]:
            y = recompute_with_rng(self.experts, rows, handle.tokens_per_expert)
        else:
            y = self.experts(rows, handle.tokens_per_expert)
        pending = self.dispatcher.start_combine(y, handle)
        ctx["back"] = pending.exchange
        return dict(back=pending.out)

    def finish(self, back: torch.Tensor, probs: torch.Tensor, shared: Optional[torch.Tensor], ctx: dict) -> torch.Tensor:
        """The third piece: the outputs arrive and are combined with the shared experts'."""
        handle = ctx["handle"]
        out = combine_rows(mappings.PendingAllToAll(back, ctx["back"]).wait(), probs, handle.pair_index,
                           handle.row_TK).to(ctx["dtype"]).view(ctx["shape"])
        return self._output(out, not ctx["gather"], (ctx["stream"], shared) if ctx["stream"] is not None else shared)

    def _own_tokens(self, x: torch.Tensor, positions: Optional[torch.Tensor]):
        """(the tokens this TP rank routes, their positions, whether ``x`` held only them already)."""
        tokens_sharded = self.sequence_parallel or self.tp.size == 1
        x_own = x if tokens_sharded else mappings.scatter_to_region(x, self.tp, dim=0)
        if positions is not None and self.tp.size > 1:
            positions = positions.chunk(self.tp.size)[self.tp.rank]  # the slice x_own holds
        return x_own, positions, tokens_sharded

    def _output(self, out: torch.Tensor, tokens_sharded: bool, shared) -> torch.Tensor:
        """The routed experts' output of this rank's tokens, back in ``x``'s layout, plus the
        shared experts' (``shared``: as ``_shared_start`` returned it)."""
        if not tokens_sharded:
            out = mappings.gather_from_region(out, self.tp, dim=0)
        shared = self._shared_finish(shared)
        return out if shared is None else out + shared

    # ----------------------------------------------------------------------------- forward

    def _shared_start(self, x: torch.Tensor, recompute: bool = False):
        """Start the shared experts: on a side stream on CUDA (overlapping dispatch, experts and
        combine on the main stream; autograd runs their backward on the same side stream),
        else inline. Returns the output, or a pending (stream, output) pair. ``recompute``:
        their MLP's activations are recomputed in backward (as they are with
        ``recompute_shared_experts`` when training)."""
        if self.shared_experts is None:
            return None
        recompute = recompute or (self.recompute_shared_experts and self.training)

        def mlp(x):
            return recompute_with_rng(self.shared_experts, x) if recompute else self.shared_experts(x)

        if not (self.shared_expert_overlap and x.is_cuda):
            return mlp(x)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=x.device)
        main = torch.cuda.current_stream(x.device)
        self._side_stream.wait_stream(main)  # x is ready
        with torch.cuda.stream(self._side_stream):
            out = mlp(x)
        return (self._side_stream, out)

    @staticmethod
    def _shared_finish(pending):
        if not isinstance(pending, tuple):
            return pending
        stream, out = pending
        main = torch.cuda.current_stream(out.device)
        main.wait_stream(stream)
        out.record_stream(main)  # its memory is used on the main stream from here on
        return out

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEStats]:
        """``x``: ``[s, b, D]`` (``[s/tp, b, D]`` with sequence parallel); ``positions``: the
        global positions of the ``s`` tokens (orders the tokens for capacity decisions)."""
        shared = self._shared_start(x)
        x_own, positions, tokens_sharded = self._own_tokens(x, positions)
        routing = self.route(x_own, positions)
        x_TD = x_own.reshape(-1, x_own.shape[-1])
        if getattr(self.dispatcher, "num_chunks", 1) > 1:
            out = self._experts_in_chunks(x_TD, routing).to(x.dtype).view_as(x_own)
        else:
            rows_ND, tokens_per_expert, handle = self.dispatch(x_TD, routing)
            y_ND = self.experts(rows_ND, tokens_per_expert, handle.fp8_rows)
            out = self.combine(y_ND, handle, x.dtype).view_as(x_own)
        out = self._output(out, tokens_sharded, shared)
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.tokens_per_expert_E, routing.num_dropped)
        return out, stats
