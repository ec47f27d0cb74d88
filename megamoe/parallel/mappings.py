"""Autograd-aware collectives for tensor, sequence and expert parallelism.

Each function is differentiable and pairs a forward collective with its adjoint in backward:

====================================  =======================  ===========================
function                              forward                  backward
====================================  =======================  ===========================
copy_to_region                        identity                 all-reduce
reduce_from_region                    all-reduce               identity
scatter_to_region(dim)                keep own slice of dim    all-gather along dim
gather_from_region(dim)               all-gather along dim     keep own slice
gather_from_sequence_region(dim)      all-gather along dim     reduce-scatter along dim
reduce_scatter_to_sequence_region     reduce-scatter           all-gather
all_to_all(out_splits, in_splits)     all-to-all (variable)    all-to-all (splits swapped)
start_all_to_all(...).wait()          the same, in flight      the same, in flight
====================================  =======================  ===========================

``start_all_to_all`` returns a :class:`PendingAllToAll`: the exchange runs while the caller
does other work, and ``wait()`` gives the received tensor. Autograd mirrors it: the backward of
``wait()`` starts the reverse exchange of the gradient and the backward of the start waits for
it, so whatever autograd runs between the two (another chunk's expert GEMMs) overlaps it.

Every function takes a :class:`~megamoe.parallel.state.Group` and is the identity for a group
of one rank. Collectives are the tensor forms (``all_gather_single`` / ``all_gather_into_tensor``,
``reduce_scatter_single`` / ``reduce_scatter_tensor``, ``all_to_all_single``) so the CPU/gloo
tests run the same code path as NCCL. Gathers and scatters along a dimension other than 0 move
that dimension to the front, which costs a copy: the model keeps sequence first ([s, b, h]) so
sequence-parallel traffic needs none.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megamoe.parallel.state import Group

# torch 2.13 renamed the tensor-form collectives; 2.11 only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# Plain (non-autograd) collectives


def all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``x`` in place over the group and return it."""
    if group.size > 1:
        dist.all_reduce(x, op=op, group=group.process_group)
    return x


def all_gather(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (in group order)."""
    if group.size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] * group.size, *front.shape[1:]))
    _all_gather_single(out, front, group=group.process_group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's equal slice of ``dim``."""
    if group.size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % group.size:
        raise ValueError(
            f"reduce_scatter over {group.name}: dimension {dim} of size {front.shape[0]} "
            f"is not divisible by the group size {group.size}"
        )
    out = front.new_empty((front.shape[0] // group.size, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=group.process_group)
    return out.movedim(0, dim)


def split_along(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's equal slice of ``dim`` (no communication)."""
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(
            f"split over {group.name}: dimension {dim} of size {x.shape[dim]} is not "
            f"divisible by the group size {group.size}"
        )
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


def all_to_all_uneven(
    x: torch.Tensor,
    group: Group,
    output_splits: Optional[Sequence[int]],
    input_splits: Optional[Sequence[int]],
    async_op: bool = False,
):
    """All-to-all along dim 0: row block i of ``x`` (``input_splits[i]`` rows) goes to rank i.

    Splits of None mean equal blocks. The result stacks the blocks received from each rank;
    with ``async_op`` it is ``(result, work)``, the result valid after ``work.wait()``.
    """
    if group.size == 1:
        return (x, None) if async_op else x
    x = x.contiguous()
    num_out = sum(output_splits) if output_splits is not None else x.shape[0]
    out = x.new_empty((num_out, *x.shape[1:]))
    work = dist.all_to_all_single(
        out,
        x,
        output_split_sizes=list(output_splits) if output_splits is not None else None,
        input_split_sizes=list(input_splits) if input_splits is not None else None,
        group=group.process_group,
        async_op=async_op,
    )
    return (out, work) if async_op else out


# ---------------------------------------------------------------------------------------------
# Autograd functions


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return all_to_all_uneven(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        grad_in = all_to_all_uneven(grad, ctx.group, ctx.input_splits, ctx.output_splits)
        return grad_in, None, None, None


class _Exchange:
    """One all-to-all in flight and, in backward, its reverse."""

    def __init__(self, group: Group, output_splits, input_splits):
        self.group, self.output_splits, self.input_splits = group, output_splits, input_splits
        self.work = self.backward_work = self.backward_result = None


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange: _Exchange):
        out, exchange.work = all_to_all_uneven(x, exchange.group, exchange.output_splits, exchange.input_splits,
                                               async_op=True)
        ctx.exchange = exchange
        return out

    @staticmethod
    def backward(ctx, _):  # the gradient that matters arrives by the reverse exchange
        exchange = ctx.exchange
        exchange.backward_work.wait()
        grad, exchange.backward_result, exchange.backward_work = exchange.backward_result, None, None
        return grad, None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, exchange: _Exchange):
        exchange.work.wait()
        exchange.work = None
        ctx.exchange = exchange
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        exchange.backward_result, exchange.backward_work = all_to_all_uneven(
            grad, exchange.group, exchange.input_splits, exchange.output_splits, async_op=True)
        return grad, None  # a stand-in: the start's backward returns the received gradient


class PendingAllToAll:
    """An all-to-all in flight (:func:`start_all_to_all`); :meth:`wait` gives its result.
    ``out`` (the buffer being filled, the autograd output of the start) may be replaced by a
    detached copy of itself when the wait runs in another autograd island (parallel/pieces.py)."""

    def __init__(self, out: torch.Tensor, exchange: Optional[_Exchange]):
        self.out, self.exchange = out, exchange

    def wait(self) -> torch.Tensor:
        return self.out if self.exchange is None else _WaitAllToAll.apply(self.out, self.exchange)


def start_all_to_all(x: torch.Tensor, group: Group, output_splits: Optional[Sequence[int]] = None,
                     input_splits: Optional[Sequence[int]] = None) -> PendingAllToAll:
    """Start :func:`all_to_all` and return at once; see the module docstring for backward."""
    if group.size == 1:
        return PendingAllToAll(x, None)
    exchange = _Exchange(group, output_splits, input_splits)
    return PendingAllToAll(_StartAllToAll.apply(x, exchange), exchange)


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a parallel region with a replicated input: identity forward, all-reduce backward."""
    return x if group.size == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a parallel region by summing partial results: all-reduce forward, identity backward."""
    return x if group.size == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice of ``dim``; backward all-gathers the gradient."""
    return x if group.size == 1 else _ScatterToRegion.apply(x, group, dim)


def gather_from_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """All-gather slices along ``dim``; backward keeps this rank's slice of the gradient."""
    return x if group.size == 1 else _GatherFromRegion.apply(x, group, dim)


def gather_from_sequence_region(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sequence parallel -> tensor parallel: all-gather the sequence; backward reduce-scatters
    (each rank's gradient is a partial sum over its weight shard)."""
    return x if group.size == 1 else _GatherFromSequenceRegion.apply(x, group, dim)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Tensor parallel -> sequence parallel: sum partial results and keep this rank's sequence
    slice; backward all-gathers."""
    return x if group.size == 1 else _ReduceScatterToSequenceRegion.apply(x, group, dim)


def all_to_all(
    x: torch.Tensor,
    group: Group,
    output_splits: Optional[Sequence[int]] = None,
    input_splits: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Differentiable all-to-all along dim 0 with variable splits (expert token exchange)."""
    return x if group.size == 1 else _AllToAll.apply(x, group, output_splits, input_splits)


def enter_tensor_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Make the activation every rank of a TP region needs: all-gather the sequence shards
    (sequence parallel) or pass the replicated tensor on; backward sums the ranks' partial
    gradients (reduce-scatter or all-reduce). Call it once when several column-parallel
    layers read the same input."""
    if sequence_parallel:
        return gather_from_sequence_region(x, group, dim=0)
    return copy_to_region(x, group)


def exit_tensor_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Sum the ranks' partial outputs of a TP region: reduce-scatter to sequence shards
    (sequence parallel) or all-reduce to a replicated tensor."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_region(x, group, dim=0)
    return reduce_from_region(x, group)
