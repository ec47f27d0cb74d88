"""Data parallelism: main gradients in contiguous buckets, reduced across data-parallel ranks.

Every trainable parameter's float32 main gradient (``param.main_grad``, float64 in float64
runs) is a view into one contiguous buffer per reduction kind and parameter dtype:

======================  ================================  =======================================
buffer                  parameters (``param.spec``)       reduction (all sums)
======================  ================================  =======================================
``dense``               attention, dense MLP, embedding,  over DP x CP (``state.dp_cp``)
                        head, shared experts
``expert``              routed experts (role ``expert``)  over expert-DP (``state.edp``)
``dense_tp``            ``grad_partial_over_tp``          over TP first (partial sums of this
                        (norms, router, MLA down-proj.)   rank's tokens), then over DP x CP
``dense_embd``          ``shared_embedding``              over the ``embd`` group first (the
                        (the embedding and the last       first and last stage's copies), then
                        stage's copy of it)               over DP x CP
======================  ================================  =======================================

``dense_tp`` and ``dense_embd`` exist only when their first group has more than one rank. Their
first reduction runs after the last backward, so their DP reduction waits for it: reducing them
over DP during backward would be fine for plain all-reduces (sums commute), but with the
distributed optimizer a reduce-scatter leaves only this rank's shard summed, and the embedding
copies sit at different offsets of the first and last stage's buffers. They are small (norm and
router weights) or computed last in backward anyway (the embedding).

Parameters fill a buffer in reverse registration order (about the order backward produces
their gradients) and are grouped into buckets of at least ``bucket_size`` elements (a parameter
never straddles two buckets). Each bucket is padded to a multiple of ``ALIGN x group size``
elements, so every rank's shard of it starts 256-byte aligned (float32). A bucket is reduced by
one collective: an all-reduce, or with the distributed optimizer a reduce-scatter after which
this rank's shard (``Bucket.shard``) holds the sum and the rest of the bucket its own
unreduced gradients.

With ``overlap``, a post-accumulate-grad hook counts each parameter's backward passes in the
step; when every parameter of a bucket has received its last micro-batch's gradient the bucket's
reduction starts asynchronously, overlapping the rest of backward. Earlier micro-batches only
accumulate. Each communicator's buckets (those reduced over one rank set) start in one order,
the same on every rank, a bucket never before the ones of its communicator ahead of it, so
every communicator sees its collectives in the same order on all its ranks even when some
parameter gets no gradient on some rank (an expert without tokens, an unused weight): such a
bucket, and those behind it, simply start in :meth:`DataParallelGrads.finish`, which starts
whatever has not started and waits for all. Communicators do not wait for each other: an expert
bucket (expert-DP) starts as soon as it is ready, whatever the dense buckets (DP x CP) ahead of
it in backward order are doing.

That order starts as reverse registration order, a guess at backward's; the first overlapped
step records the order in which each communicator's buckets really became ready (on the demo
model a layer's routed experts finish before its shared experts, registered after them, and MTP's
projection after its block), and its ``finish`` makes that the order from then on. The ranks
of a communicator agree on it through each bucket's earliest observed position over the group
(one small all-reduce per communicator, once; ties keep the current order), so a bucket that one
rank saw late (an expert that got no tokens there) neither splits the order nor moves back.

A step of one backward pass on a parameter reduced over no other rank (one data-parallel rank,
one micro-batch) needs no float32 main gradient: it would only be an exact copy of the bf16
gradient. With ``alias_single_pass`` (the Triton AdamW, which reads bf16 gradients as they are)
such a parameter's ``main_grad`` is then the gradient autograd produced, not a view of the
buffer, until the next step starts: the 6 bytes a parameter of the copy, and 2 of the
optimizer's read, saved (on the V2-Lite proxy the copy alone took 4.4 ms a step on an H200). A
second backward pass in the step after all widens it into its view and adds there.

Bucket size (``--ddp-bucket-size``): unset means Megatron-LM's ``max(40M, 1M x group size)``
elements, which for small models is one bucket per buffer.

With ``--fp8-param-gather`` each of these buffers is split in two: the weights that run native
FP8 GEMMs get a buffer of their own (``dense_fp8``, ``expert_fp8``...), whose buckets the
distributed optimizer all-gathers in FP8 (``megamoe/training/fp8_param_gather.py``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from megamoe.kernels.fp8_gemm import fp8_weight_recipe
from megamoe.numerics import upcast

# torch 2.13 renamed the tensor-form collectives; mappings.py picks the name this torch has.
from megamoe.parallel.mappings import _all_gather_single, _reduce_scatter_single
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import Group, ParallelState

ALIGN = 64  # elements: bucket shards start on 256-byte boundaries (float32)


def default_bucket_size(group_size: int) -> int:
    """Megatron-LM's default: large enough that bandwidth, not latency, dominates."""
    return max(40_000_000, 1_000_000 * group_size)


def _launch(fn, *args, group: Group):
    return fn(*args, group=group.process_group, async_op=True)


class Bucket:
    """Consecutive parameters of one buffer whose gradients are reduced by one collective.

    ``ranges`` holds ``(param, start, end)`` offsets relative to the bucket. ``grad_data`` (and
    ``param_data`` when the buffer holds the parameters too) are views of the buffer.
    """

    def __init__(self, buffer: "GradBuffer", index: int, start: int, end: int,
                 ranges: list[tuple[torch.nn.Parameter, int, int]]):
        self.buffer, self.index, self.group = buffer, index, buffer.group
        self.start, self.end, self.ranges = start, end, ranges
        self.params = [p for p, _, _ in ranges]
        self.grad_data = buffer.grad_data[start:end]
        self.param_data = None if buffer.param_data is None else buffer.param_data[start:end]
        assert (end - start) % self.group.size == 0
        self.shard_size = (end - start) // self.group.size
        self.shard_start = self.group.rank * self.shard_size  # this rank's shard, bucket offsets
        self.order = 0  # position in the launch order (set by DataParallelGrads)
        self.queue = -1  # index of its communicator's launch queue (DataParallelGrads), -1 if deferred
        self.num_ready = 0  # parameters whose last micro-batch gradient has arrived this step
        self.num_launches = 0  # lifetime count (tests check there is one per step)
        self.launched = self.launched_in_backward = False  # this step
        self._grad_work = self._grad_scratch = None
        self._param_work = self._param_send = self._param_then = None
        self._param_gathered = False  # a gather started and not yet waited for

    @property
    def deferred(self) -> bool:
        return self.buffer.pre_group is not None

    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``data`` (this bucket's grad or param data)."""
        return data[self.shard_start:self.shard_start + self.shard_size]

    # -- gradients

    def start_grad_reduce(self, reduce_scatter: bool) -> None:
        self.num_launches += 1
        self.launched = True
        if self.group.size == 1:
            return
        if reduce_scatter:
            # Into a scratch tensor, copied into the shard on wait: NCCL allows the in-place
            # form, other backends need not.
            self._grad_scratch = torch.empty_like(self.shard(self.grad_data))
            self._grad_work = _launch(_reduce_scatter_single, self._grad_scratch, self.grad_data, group=self.group)
        else:
            self._grad_work = _launch(dist.all_reduce, self.grad_data, group=self.group)

    def wait_grad_reduce(self) -> None:
        if self._grad_work is not None:
            self._grad_work.wait()
            if self._grad_scratch is not None:
                self.shard(self.grad_data).copy_(self._grad_scratch)
        self._grad_work = self._grad_scratch = None

    # -- parameters (distributed optimizer)

    def start_param_gather(self, shard: torch.Tensor, gathered: Optional[torch.Tensor] = None,
                           then: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Write every rank's updated shard (``shard``: this rank's, in the parameter dtype;
        it may be this rank's part of ``param_data`` itself, which NCCL gathers in place) into
        ``param_data``, asynchronously. ``gathered``/``then``: gather into ``gathered`` instead
        (another dtype: the FP8 gather) and hand it to ``then`` once complete."""
        self.wait_param_gather()
        into = self.param_data if gathered is None else gathered
        self._param_then = None if then is None else (then, into)
        self._param_gathered = True
        if self.group.size == 1:
            if shard.data_ptr() != into.data_ptr():  # not the step's in-place shard
                into.copy_(shard)
        else:
            self._param_work = _launch(_all_gather_single, into, shard, group=self.group)
            self._param_send = shard  # kept alive until the gather completes
        if self._param_work is None:
            self.wait_param_gather()

    def wait_param_gather(self) -> None:
        if self._param_work is not None:
            self._param_work.wait()
        self._param_work = self._param_send = None
        if self._param_then is not None:
            then, gathered = self._param_then
            self._param_then = None
            then(gathered)
        if self._param_gathered:
            # The gather wrote the parameters through the buffer, which does not move their
            # own version counters (``p.data = view`` gave each its own): what keys on a
            # weight's version (the FP8 weight caches, TE's first-micro-batch flag) would
            # keep quantizing the old weights.
            self._param_gathered = False
            for p in self.params:
                torch.autograd.graph.increment_version(p)


def bucket_layout(numels: list[int], bucket_size: int, pad_to: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Buckets of a buffer whose parameters have ``numels`` (in buffer order): ``(start, end,
    [(parameter index, lo, hi) in bucket offsets])``, each bucket at least ``bucket_size``
    elements (but the last) and padded to a multiple of ``pad_to``. Pure arithmetic: the
    buffers and the memory planner (``megamoe/training/memory_plan.py``) both use it."""
    layout, ranges, start, offset = [], [], 0, 0
    for i, n in enumerate(numels):
        ranges.append((i, offset - start, offset - start + n))
        offset += n
        if offset - start >= bucket_size or i == len(numels) - 1:
            end = -(-offset // pad_to) * pad_to
            layout.append((start, end, ranges))
            ranges, start, offset = [], end, end
    return layout


def buffer_groups(params: Iterable[torch.nn.Parameter], state: ParallelState,
                  fp8_apart: bool = False) -> list[tuple[str, list, Group, Optional[Group]]]:
    """The gradient buffers of ``params``: ``(name, members in buffer order, reduction group,
    group summed over first)``, one per reduction kind and dtype (see the module docstring).
    ``fp8_apart``: the weights that run native FP8 GEMMs get buffers of their own (``_fp8``
    names), which ``--fp8-param-gather`` all-gathers in FP8."""
    ordered = list(reversed(list(params)))  # about the order backward produces gradients
    grouped: dict[tuple[str, torch.dtype], list] = {}
    kinds = {}
    for p in ordered:
        name, group, pre_group = _kind(p, state)
        if fp8_apart and fp8_weight_recipe(p) is not None:
            name += "_fp8"
        grouped.setdefault((name, p.dtype), []).append(p)
        kinds[name] = (group, pre_group)
    return [(name, members, *kinds[name]) for (name, _), members in grouped.items()]


class GradBuffer:
    """Main gradients (and optionally the parameters) of parameters reduced over one group.

    ``params`` in buffer order. ``pre_group``: a group to sum over before ``group`` (see the
    module docstring). With ``hold_params`` the parameters' storage moves into ``param_data``
    (same layout as the gradients), so a bucket's all-gather writes them in place.
    """

    def __init__(self, name: str, params: list[torch.nn.Parameter], group: Group, pre_group: Optional[Group],
                 bucket_size: int, hold_params: bool = False):
        self.name, self.group, self.pre_group = name, group, pre_group
        dtype, device = params[0].dtype, params[0].device
        assert all(p.dtype == dtype for p in params)
        layout = [(start, end, [(params[i], lo, hi) for i, lo, hi in ranges])
                  for start, end, ranges in bucket_layout([p.numel() for p in params], bucket_size, ALIGN * group.size)]
        self.numel = layout[-1][1]
        self.grad_data = torch.zeros(self.numel, dtype=upcast(params[0]).dtype, device=device)
        self.param_data = torch.zeros(self.numel, dtype=dtype, device=device) if hold_params else None
        self.buckets = [Bucket(self, i, s, e, r) for i, (s, e, r) in enumerate(layout)]
        for bucket in self.buckets:
            for p, lo, hi in bucket.ranges:
                p.main_grad = bucket.grad_data[lo:hi].view_as(p)
                if hold_params:
                    view = bucket.param_data[lo:hi].view_as(p)
                    view.copy_(p.detach())
                    p.data = view


def _kind(p: torch.nn.Parameter, state: ParallelState) -> tuple[str, Group, Optional[Group]]:
    """(buffer name, reduction group, group summed over first) of one parameter."""
    return spec_of(p).grad_groups(state)


class DataParallelGrads:
    """The main gradients of ``params`` in bucketed buffers, and their reduction.

    Per step: :meth:`start_step` (say how many micro-batches), backward passes (the hooks
    accumulate and, with ``overlap``, start buckets), :meth:`finish` (every bucket reduced).
    ``reduce_scatter``: the distributed optimizer's reduction (only this rank's shard of each
    bucket is summed); ``hold_params``: parameters become views of contiguous buffers;
    ``fp8_apart``: FP8 weights in buffers of their own (:func:`buffer_groups`);
    ``follow_observed_order``: launch in the first overlapped step's order (see the module
    docstring; off only to measure what it changes, tools/bench_dp.py); ``alias_single_pass``:
    in a step of one backward pass, a parameter reduced over no other rank keeps the gradient
    itself as its main gradient (the module docstring; for an optimizer that reads it as it is).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], state: ParallelState, overlap: bool = False,
                 reduce_scatter: bool = False, bucket_size: Optional[int] = None, hold_params: bool = False,
                 fp8_apart: bool = False, follow_observed_order: bool = True, alias_single_pass: bool = False):
        self.overlap, self.reduce_scatter = overlap, reduce_scatter
        params = list(params)
        ordered = params[::-1]  # about the order backward produces gradients
        position = {p: i for i, p in enumerate(ordered)}
        self.buffers = [GradBuffer(name, members, group, pre_group, bucket_size or default_bucket_size(group.size),
                                   hold_params)
                        for name, members, group, pre_group in buffer_groups(params, state, fp8_apart)]
        # One launch order for all buffers: by the backward position of each bucket's last
        # parameter; deferred buckets (reduced only after their first group) go last.
        buckets = [b for buf in self.buffers for b in buf.buckets]
        self.buckets = sorted(buckets, key=lambda b: (b.deferred, max(position[p] for p in b.params)))
        # Each communicator (rank set) sees its buckets in that order on every rank; different
        # communicators do not wait for each other (an expert bucket on expert-DP need not wait
        # for a dense bucket ahead of it that is not ready yet).
        queues: dict[tuple[int, ...], list[Bucket]] = {}
        for i, b in enumerate(self.buckets):
            b.order = i
            if not b.deferred:
                queues.setdefault(tuple(b.group.ranks), []).append(b)
        self._queues = list(queues.values())
        for q, queue in enumerate(self._queues):
            for b in queue:
                b.queue = q
        self._next = [0] * len(self._queues)  # each queue's first bucket not launched this step
        # buckets in the order they became ready in backward, until the first overlapped step's
        # finish agrees on that order (None after)
        self._ready_order: Optional[list[Bucket]] = [] if overlap and follow_observed_order else None
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._counts: dict[torch.nn.Parameter, int] = {}
        self._params = ordered
        self._seen: set[torch.nn.Parameter] = set()  # parameters with a gradient this step
        self._num_micro: Optional[int] = None
        # parameters whose main gradient may be their gradient itself in a single-pass step, and
        # while it is, their views of the buffer
        self._may_alias = {p for b in self.buckets if alias_single_pass and not b.deferred and b.group.size == 1
                           for p in b.params}
        self._views: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._alias = False  # this step has one backward pass
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]

    # -- per step

    def start_step(self, num_micro: Optional[int] = None) -> None:
        """Start a step's accumulation. With ``overlap``, ``num_micro`` backward passes are
        expected per parameter (None: no overlap this step).

        Nothing is zeroed here: a parameter's first gradient of the step is copied into its main
        gradient (one cast-copy instead of a fill plus an add over the whole buffer, about 4 ms
        per step on the V2-Lite proxy), and :meth:`finish` zeroes the main gradients of
        parameters that received none. Bucket padding is never written but by reductions, which
        sum its zeros."""
        self._seen.clear()
        for p, view in self._views.items():  # the last step's gradients are let go
            p.main_grad = view
        self._views.clear()
        self._alias = num_micro == 1 and bool(self._may_alias)
        for b in self.buckets:
            b.num_ready, b.launched, b.launched_in_backward = 0, False, False
        self._counts.clear()
        self._next = [0] * len(self._queues)
        self._num_micro = num_micro if self.overlap else None

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        grad = param.grad
        if grad is None:  # a deferred weight gradient (weight_grad.py): it comes with its W
            return
        if param in self._seen:
            if param in self._views:  # a second pass after all: the first one widened into the buffer
                view = self._views.pop(param)
                torch._foreach_copy_([view], [param.main_grad])
                param.main_grad = view
            param.main_grad.add_(grad)
        elif self._alias and param in self._may_alias and grad.is_contiguous() and grad.data_ptr() % 16 == 0:
            # autograd hands over a tensor nothing else refers to (it clones one that is shared)
            self._views[param] = param.main_grad
            param.main_grad = grad
            self._seen.add(param)
        else:
            # the multi-tensor copy is vectorised, a casting copy_ is not: 4.4 vs 8.5 ms per step
            # on the V2-Lite proxy (one H200, compiled profile)
            torch._foreach_copy_([param.main_grad], [param.grad])
            self._seen.add(param)
        param.grad = None
        if self._num_micro is None:
            return
        bucket = self._bucket_of[param]
        if bucket.deferred:
            return
        count = self._counts[param] = self._counts.get(param, 0) + 1
        if count > self._num_micro:
            raise RuntimeError(
                f"a parameter received its gradient number {count} in a step announced as "
                f"{self._num_micro} micro-batches (start_step); its bucket's reduction had already started")
        if count == self._num_micro:
            bucket.num_ready += 1
            if self._ready_order is not None and bucket.num_ready == len(bucket.params):
                self._ready_order.append(bucket)
            q, queue = bucket.queue, self._queues[bucket.queue]
            while self._next[q] < len(queue) and queue[self._next[q]].num_ready == len(queue[self._next[q]].params):
                b = queue[self._next[q]]
                b.launched_in_backward = True
                b.start_grad_reduce(self.reduce_scatter)
                self._next[q] += 1

    def finish(self) -> None:
        """After the last backward: start every bucket not started yet (after summing the
        deferred buffers over their first group), then wait for all of them."""
        overlapped, self._num_micro = self._num_micro is not None, None
        # Parameters without a gradient this step (an expert that got no tokens under the loop
        # backend, an unused weight) still hold the last step's: their buckets cannot have
        # started in backward, since a bucket starts only when all its parameters are counted.
        for p in self._params:
            if p not in self._seen:
                p.main_grad.zero_()
        for queue in self._queues:  # what has not started, each communicator's buckets in its order
            for b in queue:
                if not b.launched:
                    b.start_grad_reduce(self.reduce_scatter)
        for buf in self.buffers:
            if buf.pre_group is not None and buf.pre_group.size > 1:
                dist.all_reduce(buf.grad_data, group=buf.pre_group.process_group)
        for b in self.buckets:
            if b.deferred:
                b.start_grad_reduce(self.reduce_scatter)
        for b in self.buckets:
            b.wait_grad_reduce()
        if overlapped and self._ready_order is not None:
            self._follow_observed_order()

    def _follow_observed_order(self) -> None:
        """Re-sort each communicator's launch queue by the order its buckets became ready in
        this step's backward, agreed over the communicator (see the module docstring)."""
        observed = {b: i for i, b in enumerate(self._ready_order)}
        self._ready_order = None
        agreed = []
        for queue in self._queues:
            # never ready in backward: after the ready ones, in their current order
            position = torch.tensor([observed.get(b, len(observed) + i) for i, b in enumerate(queue)],
                                    dtype=torch.float64, device=queue[0].grad_data.device)
            work = None
            if queue[0].group.size > 1:
                work = dist.all_reduce(position, op=dist.ReduceOp.MIN, group=queue[0].group.process_group,
                                       async_op=True)
            agreed.append((queue, position, work))
        for queue, position, work in agreed:
            if work is not None:
                work.wait()
            keys = position.tolist()
            queue[:] = [queue[i] for i in sorted(range(len(queue)), key=lambda i: (keys[i], i))]

    def launch_orders(self) -> list[list[Bucket]]:
        """Each communicator's buckets in the order they start in backward."""
        return [list(queue) for queue in self._queues]

    def remove_hooks(self) -> None:
        """Stop accumulating into these buffers (benchmarks that compare several setups)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- accounting

    def grad_bytes(self) -> int:
        return sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in self.buffers)

    def param_bytes(self) -> int:
        """Bytes of the parameter buffers (0 unless ``hold_params``)."""
        return sum(buf.param_data.numel() * buf.param_data.element_size()
                   for buf in self.buffers if buf.param_data is not None)
