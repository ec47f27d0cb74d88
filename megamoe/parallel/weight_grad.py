"""Deferred weight gradients: a backward pass that computes the input gradients now and leaves
the weight gradients for later (the ``W`` of zero-bubble pipeline schedules such as DualPipeV).

The GEMMs that carry most of a layer's weight-gradient work can defer it: the native dense
linears (``_Gemm`` in ``tensor_parallel.py``) and the routed experts' grouped GEMMs (``torch``
and ``loop`` backends). A model hands them one :class:`WeightGradStore` (``GPTModel.
defer_weight_grads``); their backward asks it whether to defer. When it does, the weight's
gradient is queued as a closure and autograd gets None for it; :meth:`WeightGradStore.run_next`
later computes it and accumulates it with ``weight.backward(grad)``, which runs the same
post-accumulate hooks (main gradients, data-parallel buckets) as an ordinary backward. All
other weights (norms, router, embedding, biases, the FP8 and Transformer Engine GEMMs, the
ring's re-expansion) get their gradients during the backward itself: cheap ones, or ones whose
kernels fuse both gradients. Deferred or not, the sums are the same products, so the
gradients match an ordinary backward to summation order.

Legend: N rows, K input features, O output features, E experts.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F


class WeightGradStore:
    """Weight-gradient closures, grouped by the backward pass that deferred them, run in order.

    Autograd may run backward functions on its own device threads, so the switch is a plain
    attribute (not thread-local state): only one backward runs at a time per model."""

    def __init__(self):
        self.enabled = False
        self._open: list[Callable[[], None]] = []
        self._groups: deque[list[Callable[[], None]]] = deque()

    @contextmanager
    def deferring(self, enabled: bool = True) -> Iterator[None]:
        """Run one backward pass inside: with ``enabled`` its deferrable weight gradients become
        one group for a later :meth:`run_next`."""
        self.enabled = enabled
        try:
            yield
        finally:
            self.enabled = False
            if self._open:
                self._groups.append(self._open)
                self._open = []

    @contextmanager
    def delayed(self) -> Iterator[None]:
        """Run one backward pass inside whose deferrable weight gradients are computed when it
        returns, after what it started (an exchange's reverse) is in flight. Inside an
        enclosing :meth:`deferring` they stay with that deferral (a zero-bubble schedule's W)."""
        if self.enabled:
            yield
            return
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
            delayed, self._open = self._open, []
        for accumulate in delayed:
            accumulate()

    def defer(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        self._open.append(lambda: torch.autograd.backward(weight, compute().to(weight.dtype)))

    def run_next(self) -> None:
        """Compute and accumulate the oldest deferred group's weight gradients."""
        if not self._groups:
            raise RuntimeError("no deferred weight gradients to run (a schedule ran W before its deferred B)")
        for accumulate in self._groups.popleft():
            accumulate()

    def __len__(self) -> int:
        return len(self._groups)


def _defers(store: Optional[WeightGradStore]) -> bool:
    return store is not None and store.enabled


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store: WeightGradStore):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.has_bias = store, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dy_NO, x_NK = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            if _defers(ctx.store):
                ctx.store.defer(weight, lambda: dy_NO.t() @ x_NK)
            else:
                dw = dy_NO.t() @ x_NK
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           store: Optional[WeightGradStore]) -> torch.Tensor:
    """``F.linear`` whose weight gradient ``store`` may defer (plain ``F.linear`` without one)."""
    if store is None:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, store)


def _grouped_forward(x_NK, w_EOK, offsets, counts):
    if counts is None:
        return torch._grouped_mm(x_NK, w_EOK.transpose(-2, -1), offs=offsets)
    outs = [x_e @ w_EOK[e].t() for e, x_e in enumerate(x_NK.split(counts))]
    return torch.cat(outs) if outs else x_NK.new_zeros(0, w_EOK.shape[1])


def _grouped_input_grad(dy_NO, w_EOK, offsets, counts):
    if counts is None:
        return torch._grouped_mm(dy_NO, w_EOK, offs=offsets)
    outs = [dy_e @ w_EOK[e] for e, dy_e in enumerate(dy_NO.split(counts))]
    return torch.cat(outs) if outs else dy_NO.new_zeros(0, w_EOK.shape[2])


def _grouped_weight_grad(dy_NO, x_NK, offsets, counts):
    if counts is None:
        return torch._grouped_mm(dy_NO.t(), x_NK, offs=offsets)
    return torch.stack([dy_e.t() @ x_e for dy_e, x_e in zip(dy_NO.split(counts), x_NK.split(counts))])


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK, w_EOK, tokens_per_expert, store: WeightGradStore, grouped_mm: bool):
        offsets = counts = None
        if grouped_mm:
            offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        else:
            counts = tokens_per_expert.tolist()  # host sync: the per-expert loop needs the sizes
        ctx.save_for_backward(x_NK, w_EOK, offsets)
        ctx.store, ctx.counts = store, counts
        return _grouped_forward(x_NK, w_EOK, offsets, counts)

    @staticmethod
    def backward(ctx, dy_NO):
        x_NK, w_EOK, offsets = ctx.saved_tensors
        counts, dy_NO = ctx.counts, dy_NO.contiguous()
        dx = _grouped_input_grad(dy_NO, w_EOK, offsets, counts) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            if _defers(ctx.store):
                ctx.store.defer(w_EOK, lambda: _grouped_weight_grad(dy_NO, x_NK, offsets, counts))
            else:
                dw = _grouped_weight_grad(dy_NO, x_NK, offsets, counts)
        return dx, dw, None, None, None


def grouped_linear(x_NK: torch.Tensor, w_EOK: torch.Tensor, tokens_per_expert: torch.Tensor,
                   store: WeightGradStore, grouped_mm: bool) -> torch.Tensor:
    """Rows grouped by expert times their expert's ``W^T`` (``torch._grouped_mm`` where the
    experts found it usable, else one matmul per expert), with a weight gradient ``store`` may
    defer."""
    return _GroupedLinear.apply(x_NK, w_EOK, tokens_per_expert, store, grouped_mm)
