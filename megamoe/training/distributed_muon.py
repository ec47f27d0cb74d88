"""Muon with the distributed optimizer (``--optimizer muon --use-distributed-optimizer``): each
whole matrix is orthogonalised by one data-parallel rank, its owner, instead of by all of them.

The gradients, masters and optimizer states stay in the distributed optimizer's flat shards
(:mod:`megamoe.training.distributed_optimizer`): the reduce-scatter, the parameter all-gather,
the checkpoints and the memory per rank are the ZeRO-1 ones, with Muon's momentum (one float32
tensor) where AdamW keeps two moments. What Muon adds, per step and per data-parallel group
(DP x CP for dense weights, expert-DP for experts):

1. momentum on this rank's flat pieces of the matrices (elementwise, so a slice is enough);
2. an all-to-all sends each piece of the momentum update to the matrix's owner, which then
   holds it whole (over TP or expert-TP it is then gathered as without the distributed
   optimizer, among owners, since every TP rank of a DP rank owns the same matrices);
3. the owner orthogonalises and scales it (:func:`~megamoe.training.muon.orthogonalized_update`);
4. a second all-to-all returns each piece of the result to the rank whose shard holds it,
   which applies weight decay and the update to its masters; the usual all-gather follows.

A *matrix* is one weight matrix: a 2-D weight, or one expert of a stacked expert weight (the
halves of a fused [gate | up] stay together and are orthogonalised apart). Owners are assigned
once, largest first to the least loaded rank, by the cost of a Newton-Schulz iteration
(``rows x cols x min(rows, cols)``), so each rank runs about ``1 / DP`` of the iterations.

What moves: each all-to-all carries this rank's shard of the matrices, less the part it owns
itself, in the masters' dtype: on average ``(DP - 1) / DP^2`` of the matrices' float32 bytes
per rank and direction, ``2 / DP`` of what the gradient reduce-scatter moves for them
(``(DP - 1) / DP``). The tests count it. Memory: the owner holds its matrices' updates whole
for the duration of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megamoe.config import ParallelConfig, TrainingConfig
from megamoe.parallel import mappings
from megamoe.parallel.data_parallel import Bucket
from megamoe.parallel.state import Group, ParallelState
from megamoe.training.distributed_optimizer import DistributedOptimizer, Piece
from megamoe.training.muon import (
    MomentumStates,
    is_matrix,
    momentum_update,
    newton_schulz_cost,
    orthogonalized_update,
)
from megamoe.training.optimizer import MasterEdit


@dataclass
class Matrix:
    """One weight matrix: elements ``[lo, hi)`` of ``bucket`` (bucket offsets), a slice of
    ``param`` shaped ``shape``; orthogonalised by rank ``owner`` of the bucket's group."""

    param: nn.Parameter
    bucket: Bucket
    lo: int
    hi: int
    shape: tuple[int, ...]
    owner: int = 0


@dataclass
class Segment:
    """Elements ``[lo, hi)`` (bucket offsets) of ``matrix`` that the shard of rank ``peer`` holds."""

    matrix: Matrix
    peer: int
    lo: int
    hi: int


def _matrices_of(bucket: Bucket) -> list[Matrix]:
    out = []
    for p, lo, hi in bucket.ranges:
        if not is_matrix(p):
            continue
        m, n = p.shape[-2:]
        shape = (1,) * (p.ndim - 2) + (m, n)  # one expert of a stacked weight keeps the leading dims
        out += [Matrix(p, bucket, start, start + m * n, shape) for start in range(lo, hi, m * n)]
    return out


def _assign_owners(matrices: list[Matrix], size: int) -> None:
    """Largest first to the least loaded rank (ties: the lowest): the same on every rank."""
    load = [0] * size
    for mat in sorted(matrices, key=lambda x: -newton_schulz_cost(x.param)):  # stable: ties in bucket order
        mat.owner = min(range(size), key=lambda r: (load[r], r))
        load[mat.owner] += newton_schulz_cost(mat.param)


def _overlap(mat: Matrix, rank: int) -> tuple[int, int]:
    """The part ``[lo, hi)`` of ``mat`` in the shard of ``rank`` (empty when lo >= hi)."""
    size = mat.bucket.shard_size
    return max(mat.lo, rank * size), min(mat.hi, (rank + 1) * size)


class Exchange:
    """The matrices of the buckets reduced over one group, and who sends which piece where.

    ``sends``: the segments of this rank's shard, by owner; ``receives``: the segments of the
    matrices this rank owns, by the rank whose shard holds them. Both lists run in matrix
    order within each peer, so a peer's block of an all-to-all is read in the order written."""

    def __init__(self, group: Group, buckets: list[Bucket]):
        self.group = group
        self.matrices = [mat for b in buckets for mat in _matrices_of(b)]
        _assign_owners(self.matrices, group.size)
        self.mine = [mat for mat in self.matrices if mat.owner == group.rank]
        me = group.rank
        # stable sorts: matrix order within each peer
        self.sends = sorted((Segment(mat, mat.owner, *_overlap(mat, me)) for mat in self.matrices
                             if _overlap(mat, me)[0] < _overlap(mat, me)[1]), key=lambda s: s.peer)
        self.receives = [Segment(mat, r, *_overlap(mat, r)) for r in range(group.size) for mat in self.mine
                         if _overlap(mat, r)[0] < _overlap(mat, r)[1]]
        self.send_splits = self._splits(self.sends)
        self.receive_splits = self._splits(self.receives)

    def _splits(self, segments: list[Segment]) -> list[int]:
        splits = [0] * self.group.size
        for s in segments:
            splits[s.peer] += s.hi - s.lo
        return splits


class DistributedMuon(MomentumStates, DistributedOptimizer):
    """Muon over this rank's shards of the weight matrices, AdamW over the rest of its shards
    (see the module docstring)."""

    def __init__(self, model: nn.Module, t: TrainingConfig, state: ParallelState, parallel: ParallelConfig,
                 fp8_param_gather: bool = False):
        super().__init__(model, t, state, parallel, fp8_param_gather)
        self.skips_on_device = False  # Muon divides its matrices' gradients by the clip itself, read on the host
        self.t = t
        groups: dict[tuple[str, tuple[int, ...]], list[Bucket]] = {}
        for b in self.grads.buckets:
            groups.setdefault((b.group.name, b.group.ranks), []).append(b)
        # every rank of a stage runs the dense exchange, then the expert one
        self.exchanges = [Exchange(buckets[0].group, buckets) for _, buckets in sorted(groups.items())]
        self.momentum: dict[Piece, torch.Tensor] = {}  # per matrix piece of this rank's shard

    def _adam_updates(self, param: nn.Parameter) -> bool:
        return not is_matrix(param)

    def _matrix_pieces(self) -> list[Piece]:
        return [x for pieces in self.pieces.values() for x in pieces if is_matrix(x.param)]

    @torch.no_grad()
    def step(self, lr: float, edit_masters: Optional[MasterEdit] = None) -> None:
        self.finish_param_sync()
        self._muon_step(lr)
        super().step(lr, edit_masters)  # AdamW over the rest, the edit, then the all-gather

    def _muon_step(self, lr: float) -> None:
        # A clip left to the fused AdamW (clip_grad_norm): Muon divides its gradients here, and
        # the AdamW step that follows still reads it.
        divisor = self._grad_scale
        update = self._shard_buffers()  # the momentum update over this rank's shard of each bucket
        for x in self._matrix_pieces():
            g = x.grad if divisor is None else x.grad / divisor
            buf = self.momentum.get(x)
            if buf is None:
                buf = self.momentum[x] = torch.zeros_like(x.master)
            _in_shard(update, x.bucket, x.lo, x.hi).copy_(momentum_update(buf, g, self.t))
        result = self._shard_buffers()
        for exchange in self.exchanges:
            self._orthogonalize(exchange, update, result)
        for x in self._matrix_pieces():
            x.master.mul_(1 - lr * self.t.weight_decay)
            x.master.add_(_in_shard(result, x.bucket, x.lo, x.hi), alpha=-lr)

    def _shard_buffers(self) -> dict[Bucket, torch.Tensor]:
        return {b: torch.zeros(b.shard_size, dtype=b.grad_data.dtype, device=b.grad_data.device)
                for exchange in self.exchanges for b in {mat.bucket for mat in exchange.matrices}}

    def _orthogonalize(self, exchange: Exchange, update: dict[Bucket, torch.Tensor],
                       result: dict[Bucket, torch.Tensor]) -> None:
        """Write the scaled, orthogonalised update of the matrices of ``exchange`` into
        ``result`` (this rank's shards), from the momentum updates in ``update`` (the same)."""
        if not exchange.matrices:
            return
        sample = exchange.matrices[0].bucket.grad_data
        send = _concat([_in_shard(update, s.matrix.bucket, s.lo, s.hi) for s in exchange.sends], sample)
        received = mappings.all_to_all_uneven(send, exchange.group, exchange.receive_splits, exchange.send_splits)
        whole = {id(mat): sample.new_empty(mat.hi - mat.lo) for mat in exchange.mine}
        for s, piece in zip(exchange.receives, received.split([s.hi - s.lo for s in exchange.receives])):
            whole[id(s.matrix)][s.lo - s.matrix.lo:s.hi - s.matrix.lo] = piece
        by_param: dict[nn.Parameter, list[Matrix]] = {}
        for mat in exchange.mine:
            by_param.setdefault(mat.param, []).append(mat)
        # the TP / expert-TP gathers run here, among the owners; an owner's experts of one weight
        # go as one batch (the iteration then runs batched matmuls, as without the sharding)
        for param, mats in by_param.items():
            batch = torch.cat([whole[id(mat)].view(mat.shape) for mat in mats])
            ortho = orthogonalized_update(batch, param, self.state, self.t)
            for mat, piece in zip(mats, ortho.split(1) if len(mats) > 1 else [ortho]):
                whole[id(mat)] = piece.reshape(-1)
        back = _concat([whole[id(s.matrix)][s.lo - s.matrix.lo:s.hi - s.matrix.lo] for s in exchange.receives], sample)
        returned = mappings.all_to_all_uneven(back, exchange.group, exchange.send_splits, exchange.receive_splits)
        for s, piece in zip(exchange.sends, returned.split([s.hi - s.lo for s in exchange.sends])):
            _in_shard(result, s.matrix.bucket, s.lo, s.hi).copy_(piece)

    # -- state

    def _piece_states(self, x: Piece) -> dict[str, torch.Tensor]:
        if x in self.momentum:
            return {"master": x.master, "momentum_buffer": self.momentum[x]}
        return super()._piece_states(x)

    def ensure_state(self) -> None:
        super().ensure_state()
        for x in self._matrix_pieces():
            self.momentum.setdefault(x, torch.zeros_like(x.master))



def _in_shard(shards: dict[Bucket, torch.Tensor], bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` (bucket offsets, inside this rank's shard) of ``shards[bucket]``."""
    return shards[bucket][lo - bucket.shard_start:hi - bucket.shard_start]


def _concat(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(pieces) if pieces else like.new_empty(0)
