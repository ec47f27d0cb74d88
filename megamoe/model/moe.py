"""The MoE layer: route -> dispatch -> experts -> combine, plus shared experts.

Shape legend: S sequence positions on this rank, B sequences, T = S*B tokens on this rank,
D hidden, K experts per token, E experts, N dispatched rows (token copies) on this rank.

Token ownership: inside the layer every rank of the TP group works on a different slice of the
sequence. With sequence parallel that is already the case; without it the replicated input is
sliced on entry and the output all-gathered on exit. So the router's gradients are partial
sums over TP (``weight.sequence_parallel``) and expert gradients are partial sums over
expert-DP, whatever the layout.

Dispatch (``allgather``): tokens, probabilities and choices are all-gathered over the
``etp x ep`` group; each rank runs the rows routed to its local experts on its expert-TP slice
of the FFN, scatters the weighted rows back into the gathered token order and reduce-scatters
over ``etp x ep``. That one reduce-scatter sums the expert-TP partial sums and the
contributions of the experts on other EP ranks. Host synchronisation: selecting this rank's
rows (``nonzero``) when experts are spread over EP or tokens are dropped, since the number of
rows sets the shapes; none otherwise on the ``torch._grouped_mm`` path. The ``loop`` and
``te`` backends read the per-expert counts on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megamoe.model.experts import GroupedExperts
from megamoe.model.mlp import MLP
from megamoe.model.router import Routing, TopKRouter
from megamoe.numerics import upcast
from megamoe.parallel import mappings
from megamoe.parallel.state import Group


@dataclass
class MoEStats:
    """Per-layer, per-micro-batch numbers for the loss, the bias update and the logs."""

    aux_loss: torch.Tensor  # this rank's share of the balancing loss (differentiable)
    z_loss: torch.Tensor  # this rank's share of the z-loss (differentiable)
    tokens_per_expert: torch.Tensor  # assignments over the micro-batch (detached, float32)
    num_dropped: torch.Tensor  # pairs dropped over the micro-batch


@dataclass
class Dispatched:
    """Rows for the local experts and what combine needs to put them back."""

    rows_ND: torch.Tensor
    tokens_per_expert: torch.Tensor  # [local experts] int64, on device
    token_index_N: torch.Tensor  # row -> index into the gathered token order
    probs_N: torch.Tensor  # row -> combine weight (float32, differentiable)
    num_gathered_tokens: int


class MoELayer(nn.Module):
    """Router (``gate``), routed experts (``experts``) and optional ``shared_experts``."""

    def __init__(
        self,
        router: TopKRouter,
        experts: GroupedExperts,
        shared_experts: Optional[MLP],
        tp: Group,
        etp_ep: Group,
        dp: Optional[Group] = None,
        sequence_parallel: bool = False,
        pad_to_capacity: bool = False,
    ):
        super().__init__()
        self.gate, self.experts, self.shared_experts = router, experts, shared_experts
        self.tp, self.etp_ep, self.dp = tp, etp_ep, dp
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.pad_to_capacity = pad_to_capacity
        self.num_local_experts = experts.num_local_experts
        self.first_expert = experts.first_expert

    # ----------------------------------------------------------------------------- stages

    def route(self, x_SBD: torch.Tensor) -> Routing:
        return self.gate(x_SBD.reshape(-1, x_SBD.shape[-1]), x_SBD.shape[1], self.tp, self.dp)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        group, K = self.etp_ep, self.gate.topk
        x_all = mappings.gather_from_sequence_region(x_TD, group, dim=0)
        probs_all = mappings.gather_from_sequence_region(routing.probs_TK, group, dim=0)
        experts_all = mappings.all_gather(routing.experts_TK, group, dim=0)
        kept_all = None if routing.kept_TK is None else mappings.all_gather(routing.kept_TK, group, dim=0)

        local_TK = experts_all - self.first_expert
        if self.num_local_experts == self.gate.num_experts and kept_all is None:
            # Every pair is mine: skip the selection (nonzero() would synchronise with the host).
            pair = torch.arange(local_TK.numel(), device=local_TK.device)
        else:
            mine = (local_TK >= 0) & (local_TK < self.num_local_experts)
            if kept_all is not None:
                mine &= kept_all
            pair = mine.reshape(-1).nonzero().squeeze(1)  # (token, k) pairs for my experts, token-major
        local_expert = local_TK.reshape(-1)[pair]
        order = torch.sort(local_expert, stable=True).indices  # group rows by expert, keep token order
        pair, local_expert = pair[order], local_expert[order]
        token_index = pair // K
        tokens_per_expert = torch.bincount(local_expert, minlength=self.num_local_experts)
        rows = x_all[token_index]
        probs = probs_all.reshape(-1)[pair]
        if self.pad_to_capacity and routing.capacity is not None:
            rows, tokens_per_expert, token_index, probs = self._pad(rows, tokens_per_expert, token_index,
                                                                    probs, routing.capacity, x_all.shape[0])
        return Dispatched(rows, tokens_per_expert, token_index, probs, x_all.shape[0])

    def _pad(self, rows, tokens_per_expert, token_index, probs, capacity, num_tokens):
        """Give every local expert exactly ``capacity`` rows (static shapes). Padding rows are
        zeros whose combine weight is 0 and whose target is a scratch row past the tokens."""
        E = self.num_local_experts
        slot = torch.arange(rows.shape[0], device=rows.device) - (
            torch.cumsum(tokens_per_expert, 0) - tokens_per_expert).repeat_interleave(tokens_per_expert)
        dest = torch.repeat_interleave(torch.arange(E, device=rows.device), tokens_per_expert) * capacity + slot
        padded_rows = rows.new_zeros(E * capacity, rows.shape[1]).index_copy(0, dest, rows)
        padded_index = torch.full((E * capacity,), num_tokens, dtype=token_index.dtype, device=rows.device)
        padded_index = padded_index.index_copy(0, dest, token_index)
        padded_probs = probs.new_zeros(E * capacity).index_copy(0, dest, probs)
        counts = torch.full_like(tokens_per_expert, capacity)
        return padded_rows, counts, padded_index, padded_probs

    def combine(self, y_ND: torch.Tensor, d: Dispatched, dtype: torch.dtype) -> torch.Tensor:
        weighted = upcast(y_ND) * d.probs_N.unsqueeze(1).to(upcast(y_ND).dtype)
        out = weighted.new_zeros(d.num_gathered_tokens + 1, y_ND.shape[1])  # +1: padding scratch row
        out = out.index_add(0, d.token_index_N, weighted)[: d.num_gathered_tokens]
        out = mappings.reduce_scatter_to_sequence_region(out, self.etp_ep, dim=0)
        return out.to(dtype)

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """``x``: ``[s, b, D]`` (``[s/tp, b, D]`` with sequence parallel)."""
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        tokens_sharded = self.sequence_parallel or self.tp.size == 1
        x_own = x if tokens_sharded else mappings.scatter_to_region(x, self.tp, dim=0)
        routing = self.route(x_own)
        x_TD = x_own.reshape(-1, x_own.shape[-1])
        dispatched = self.dispatch(x_TD, routing)
        y_ND = self.experts(dispatched.rows_ND, dispatched.tokens_per_expert)
        out = self.combine(y_ND, dispatched, x.dtype).view_as(x_own)
        if not tokens_sharded:
            out = mappings.gather_from_region(out, self.tp, dim=0)
        if shared is not None:
            out = out + shared
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.tokens_per_expert_E, routing.num_dropped)
        return out, stats
