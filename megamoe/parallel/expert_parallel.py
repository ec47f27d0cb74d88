"""Token dispatchers: bring each (token, expert) pair to the rank that holds the expert and back.

Shape legend: T tokens on this rank, K experts per token, D hidden, E experts in all,
L = E / ep experts on this rank, N rows (token copies) handed to the local experts.

Both dispatchers take this rank's tokens ``x_TD`` with the router's ``probs_TK``,
``experts_TK`` and optional ``kept_TK`` (capacity), and return rows grouped by local expert
plus a handle; ``combine`` takes the experts' output rows (partial sums over expert-TP) and
returns ``[T, D]``: the probability-weighted sum over each token's kept experts. Copying tokens
to rows and summing rows into tokens are the gathers of ``permutation.py`` (no atomics).

- :class:`AllGatherDispatcher` all-gathers tokens and routing over ``etp x ep`` and keeps the
  pairs of the local experts; combine sums the weighted rows into the gathered token order
  and reduce-scatters over ``etp x ep`` (which also sums the expert-TP partials).
- :class:`AllToAllDispatcher` permutes the pairs by expert, exchanges per-expert counts and then
  the rows over EP with variable splits, all-gathers them over expert-TP (as a variable all-to-all),
  and sorts them by local expert; combine reverses every step.

Host synchronisation (``AllToAllDispatcher``): one, to read the split sizes that the all-to-all
calls need (rows to send to each EP rank, rows coming from each EP / expert-TP rank). With
``pad_to_capacity`` every split is static and there is none.

Padding (``pad_multiple``, ``--moe-router-padding-for-fp8``): every local expert's rows are
padded with zero rows to a multiple (16: the FP8 GEMMs' alignment). The padding rows point at
the scratch pair, so the combine weights them 0 and no output or gradient changes. The
all-to-all dispatcher pads each (rank, expert) chunk before the exchange (the sums stay
multiples); the all-gather dispatcher reads the padded row count to the host (one sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.kernels.fp8 import E4M3, quantize
from megamoe.parallel import mappings
from megamoe.parallel.permutation import (combine_rows, count_per_expert, permute_quantized, permute_tokens,
                                          permute_tokens_backward, row_of_pair)
from megamoe.parallel.state import Group


@dataclass
class DispatchHandle:
    """What combine needs to undo a dispatch."""

    pair_index: torch.Tensor  # per row: its (token, k) pair in the (gathered) [T, K] order; padding rows: T*K
    probs_TK: torch.Tensor  # combine weights of the (gathered) tokens (differentiable)
    row_TK: torch.Tensor  # the inverse: each pair's row, -1 for a dropped pair
    # all-to-all only
    restore: Optional[torch.Tensor] = None  # row order after sorting by local expert -> received order
    ep_send: Optional[list[int]] = None
    ep_recv: Optional[list[int]] = None
    etp_sizes: Optional[list[int]] = None  # rows each expert-TP rank received over EP
    fp8_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # FP8 dispatch: (values, scale_inv) of the rows


def _sort_pairs(experts_TK: torch.Tensor, kept_TK: Optional[torch.Tensor], first: int, count: int,
                num_experts: int):
    """(pair index, expert - first) of the pairs routed to experts [first, first+count), grouped by
    expert with token order kept inside each group."""
    local = experts_TK.reshape(-1) - first
    if kept_TK is None and first == 0 and count == num_experts:
        # Every pair qualifies: a sort suffices (nonzero() would synchronise with the host).
        order = torch.sort(local, stable=True).indices
        return order, local[order]
    mine = (local >= 0) & (local < count)
    if kept_TK is not None:
        mine &= kept_TK.reshape(-1)
    pair = mine.nonzero().squeeze(1)
    order = torch.sort(local[pair], stable=True).indices
    return pair[order], local[pair][order]


def pad_pairs(pair_N: torch.Tensor, counts_G: torch.Tensor, padded_G: torch.Tensor, total: int,
              scratch_index: int) -> torch.Tensor:
    """[total] the pair index of rows grouped ``padded_G[g]`` (>= ``counts_G[g]``) per group:
    each group's pairs in order, then padding rows aimed at the scratch pair. Padding rows are
    zero rows (``permute_tokens``) weighted 0 by the combine, so no result changes."""
    N = pair_N.numel()
    shift = (torch.cumsum(padded_G, 0) - padded_G) - (torch.cumsum(counts_G, 0) - counts_G)
    dest = torch.arange(N, device=pair_N.device) + shift.repeat_interleave(counts_G, output_size=N)
    return torch.full((total,), scratch_index, dtype=pair_N.dtype, device=pair_N.device).index_copy(0, dest, pair_N)


def padded_counts(counts_G: torch.Tensor, capacity: Optional[int], multiple: int) -> Optional[torch.Tensor]:
    """Each group's padded row count: ``capacity`` when every group is padded to it, else the
    count rounded up to ``multiple`` (FP8 GEMM alignment); None when nothing is padded."""
    if capacity is not None:
        return torch.full_like(counts_G, capacity)
    if multiple > 1:
        return (counts_G + multiple - 1) // multiple * multiple
    return None


class AllGatherDispatcher:
    """All-gather over ``etp x ep``; suits small EP and TP-heavy layouts."""

    def __init__(self, etp_ep: Group, num_experts: int, num_local_experts: int, first_expert: int,
                 pad_to_capacity: bool = False, pad_multiple: int = 1):
        self.group, self.E, self.L, self.first = etp_ep, num_experts, num_local_experts, first_expert
        self.pad_to_capacity, self.pad_multiple = pad_to_capacity, pad_multiple

    def dispatch(self, x_TD, probs_TK, experts_TK, kept_TK=None, capacity=None):
        g, K = self.group, experts_TK.shape[1]
        x_all = mappings.gather_from_sequence_region(x_TD, g, dim=0)
        probs_all = mappings.gather_from_sequence_region(probs_TK, g, dim=0)
        experts_all = mappings.all_gather(experts_TK, g, dim=0)
        kept_all = None if kept_TK is None else mappings.all_gather(kept_TK, g, dim=0)
        pair, expert = _sort_pairs(experts_all, kept_all, self.first, self.L, self.E)
        tokens_per_expert = count_per_expert(expert, self.L)
        # each gathered rank's micro-batch slice may fill an expert's capacity
        full = capacity * g.size if self.pad_to_capacity and capacity is not None else None
        padded = padded_counts(tokens_per_expert, full, self.pad_multiple)
        if padded is not None:
            # the padded total sizes the rows: static with a capacity, else one host sync
            total = self.L * full if full is not None else int(padded.sum())
            pair, tokens_per_expert = pad_pairs(pair, tokens_per_expert, padded, total, probs_all.numel()), padded
        row_TK = row_of_pair(pair, probs_all.numel()).view(-1, K)
        rows = permute_tokens(x_all, pair, row_TK)
        return rows, tokens_per_expert, DispatchHandle(pair, probs_all, row_TK)

    def combine(self, y_ND, handle: DispatchHandle) -> torch.Tensor:
        out = combine_rows(y_ND, handle.probs_TK, handle.pair_index, handle.row_TK)
        return mappings.reduce_scatter_to_sequence_region(out, self.group, dim=0)


class AllToAllDispatcher:
    """All-to-all over EP (then a variable all-gather over expert-TP)."""

    def __init__(self, ep: Group, etp: Group, num_experts: int, pad_to_capacity: bool = False,
                 pad_multiple: int = 1, fp8_dispatch: bool = False):
        self.ep, self.etp, self.E = ep, etp, num_experts
        self.L = num_experts // ep.size
        self.pad_to_capacity, self.pad_multiple, self.fp8_dispatch = pad_to_capacity, pad_multiple, fp8_dispatch

    def dispatch(self, x_TD, probs_TK, experts_TK, kept_TK=None, capacity=None):
        K, device = experts_TK.shape[1], x_TD.device
        # 1. sort this rank's kept pairs by global expert (= by destination EP rank); padding
        # each (rank, expert) chunk to a multiple pads each local expert's rows to one
        pair, expert = _sort_pairs(experts_TK, kept_TK, 0, self.E, self.E)
        real_counts_E = count_per_expert(expert, self.E)
        static = self.pad_to_capacity and capacity is not None
        padded = padded_counts(real_counts_E, capacity if static else None, self.pad_multiple)
        counts_E = real_counts_E if padded is None else padded
        if static:  # every split is static: no count exchange, no host sync
            recv_counts = counts_E.new_full((self.etp.size, self.ep.size, self.L), capacity)
            ep_send = ep_recv = [self.L * capacity] * self.ep.size
            etp_sizes = [self.ep.size * self.L * capacity] * self.etp.size
        else:
            # 2. exchange counts: recv[s, l] = rows EP rank s sends for my local expert l
            recv_counts = mappings.all_to_all_uneven(counts_E.view(self.ep.size, self.L).contiguous(), self.ep,
                                                     None, None)
            recv_counts = mappings.all_gather(recv_counts.unsqueeze(0), self.etp, dim=0)  # [etp, ep, L]
            # 3. one host sync for every split size (and the padded row count)
            host = torch.cat([counts_E.view(self.ep.size, self.L).sum(1), recv_counts.flatten()]).tolist()
            ep_send = host[: self.ep.size]
            per = torch.tensor(host[self.ep.size:]).view(recv_counts.shape)
            ep_recv = per[self.etp.rank].sum(1).tolist()
            etp_sizes = per.sum((1, 2)).tolist()
        if padded is not None:
            pair = pad_pairs(pair, real_counts_E, padded, sum(ep_send), probs_TK.numel())
        row_TK = row_of_pair(pair, probs_TK.numel()).view(-1, K)
        # 4. the received rows will arrive [etp rank][ep rank][expert]: the order that groups
        # them by local expert
        local_expert = torch.arange(self.L, device=device).repeat(recv_counts.shape[0] * recv_counts.shape[1])
        local_expert = local_expert.repeat_interleave(recv_counts.flatten().to(device), output_size=sum(etp_sizes))
        order = torch.sort(local_expert, stable=True).indices
        tokens_per_expert = recv_counts.sum((0, 1)).to(device)
        handle = DispatchHandle(pair, probs_TK, row_TK, restore=order, ep_send=ep_send, ep_recv=ep_recv,
                                etp_sizes=etp_sizes)
        # 5. the pairs' rows (in FP8 with fp8_dispatch) to the EP ranks holding their experts,
        # gathered over expert-TP, grouped by local expert
        if self.fp8_dispatch:
            return _Fp8Exchange.apply(x_TD, pair, row_TK, self, handle), tokens_per_expert, handle
        rows = permute_tokens(x_TD, pair, row_TK)
        return self._send(rows, handle), tokens_per_expert, handle

    def _send(self, rows: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Step 5: this rank's rows to the ranks holding their experts, grouped by local expert
        there."""
        received = mappings.all_to_all(rows, self.ep, handle.ep_recv, handle.ep_send)
        if self.etp.size > 1:
            mine = handle.etp_sizes[self.etp.rank]
            received = mappings.all_to_all(received.repeat(self.etp.size, 1), self.etp, handle.etp_sizes,
                                           [mine] * self.etp.size)
        return received[handle.restore]

    def _return(self, y_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """The reverse of :meth:`_send` (its adjoint): rows back to the ranks that sent them,
        the expert-TP copies summed."""
        y = torch.empty_like(y_ND).index_copy(0, handle.restore, y_ND)  # back to arrival order
        if self.etp.size > 1:
            mine = handle.etp_sizes[self.etp.rank]
            y = mappings.all_to_all(y, self.etp, [mine] * self.etp.size, handle.etp_sizes)
            y = y.view(self.etp.size, mine, -1).sum(0)  # sum the expert-TP partials
        return mappings.all_to_all(y, self.ep, handle.ep_send, handle.ep_recv)

    def combine(self, y_ND, handle: DispatchHandle) -> torch.Tensor:
        return combine_rows(self._return(y_ND, handle), handle.probs_TK, handle.pair_index, handle.row_TK)


class _Fp8Exchange(torch.autograd.Function):
    """FP8 dispatch (DeepSeek-V3's): the tokens are quantized (e4m3, one power-of-two scale per
    row, as the experts' rowwise FP8 GEMM would quantize their copies) before the permutation,
    so the permutation and the exchange move one byte per value (and a float32 scale per row)
    instead of two, and no bf16 copy of the rows is made. The values and scales land in
    ``handle.fp8_rows`` for the experts' first GEMM; the returned tensor is a zero-size stand-in
    of the received rows' shape that carries the gradient. Backward takes the bf16 gradient
    along the reverse path (the combine's movement, then the permutation's backward)."""

    @staticmethod
    def forward(ctx, x_TD, pair, row_TK, dispatcher: "AllToAllDispatcher", handle: DispatchHandle):
        q_T, scale_inv_T = quantize(x_TD, E4M3, "rowwise")
        q, scale_inv = permute_quantized(q_T, scale_inv_T, pair, row_TK.shape[1])
        q_recv = dispatcher._send(q, handle).view(E4M3)  # FP8 travels as bytes
        s_recv = dispatcher._send(scale_inv[:, None], handle)[:, 0]
        handle.fp8_rows = (q_recv, s_recv)
        ctx.save_for_backward(row_TK)
        ctx.dispatcher, ctx.handle = dispatcher, handle
        return x_TD.new_empty(()).expand(q_recv.shape)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_TK,) = ctx.saved_tensors
        grad_sent = ctx.dispatcher._return(grad_rows.contiguous(), ctx.handle)
        return permute_tokens_backward(grad_sent, row_TK), None, None, None, None
