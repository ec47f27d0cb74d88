"""FP8 linear and grouped-expert GEMMs with their backward (the native FP8 path).

Each GEMM ``y = x W^T`` runs as:

- forward: ``x`` and ``W`` quantized to e4m3 (``fp8.quantize``), ``torch._scaled_mm`` (dense) or
  ``torch._scaled_grouped_mm`` (experts), fast accumulation, output in ``x``'s dtype;
- input gradient: ``dy`` quantized to the recipe's gradient format (e5m2 for ``hybrid``; e4m3
  for the experts, whose grouped GEMM takes e4m3 only) and
  ``W^T`` to e4m3, the same GEMMs with full-precision accumulation (as Transformer Engine's
  split accumulator for dgrad);
- weight gradient: ``dy^T x`` in the activations' dtype (bf16), from the saved bf16 input. This is
  torchao's "rowwise with high-precision grad-weight" choice: it keeps the weight gradients,
  which the optimizer accumulates over micro-batches, at bf16 accuracy.

Weights are quantized once per weight version (``Fp8WeightCache``): the optimizer step writes
each weight in place, which moves its version counter, so every micro-batch and every
recomputation between two steps reuses one quantization.

Tensor parallelism: ``cut`` says which dimension of the weight the layer's ranks split
(``"out"`` column-parallel, ``"in"`` row-parallel, None). The operands whose scaling unit is
cut by it (a row of a row-parallel layer's input, a column-parallel layer's output gradient,
a whole sharded weight under tensorwise scaling...) have their amax reduced with
``reduce_amax`` (a max over the group), so each rank quantizes as the single-GPU layer would.

Without CUDA, the grouped GEMM runs expert by expert with ``torch._scaled_mm`` (torch's CPU
build has it, not ``_scaled_grouped_mm``): the same products, so the CPU tests exercise the
quantization, the scales' layout and the backward of the GPU path.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from megamoe.eager import eager_under_compile
from megamoe.kernels.fp8 import (E4M3, AmaxReduce, Fp8Recipe, RowGroups, dequantize, quantize, quantize_transposed,
                                 swiglu_backward, swiglu_backward_quantize, swiglu_quantize)

Cut = Optional[Literal["in", "out"]]


class Fp8WeightCache:
    """One weight's FP8 copies (forward ``W`` and backward ``W^T``), remade when the weight changes."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, weight: torch.Tensor, which: str, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            self._key, self._copies = key, {}
        if which not in self._copies:
            self._copies[which] = make()
        return self._copies[which]


def mark_fp8_weight(weight: torch.nn.Parameter, recipe: Fp8Recipe, cut: Cut) -> None:
    """Say that ``weight``'s GEMMs run the native FP8 recipe ``recipe``, its layer cut over TP as
    ``cut`` (the distributed optimizer's ``--fp8-param-gather`` quantizes it as they do)."""
    weight.fp8_recipe, weight.fp8_cut = recipe, cut


def fp8_weight_recipe(param: torch.Tensor) -> Optional[Fp8Recipe]:
    """The native FP8 recipe of a weight marked by :func:`mark_fp8_weight`, else None."""
    return getattr(param, "fp8_recipe", None)


def weight_unit_is_cut(recipe: Fp8Recipe, cut: Cut) -> bool:
    """Whether the layer's TP cut splits a scaling unit of its weight's forward copy (a row
    along K when the input dimension is cut; the matrix when either is)."""
    return cut == "in" if recipe.granularity == "rowwise" else cut is not None


def _reduce_for(rows_cut: bool, tensor_cut: bool, recipe: Fp8Recipe, reduce_amax: AmaxReduce) -> AmaxReduce:
    """The reduction an operand needs: when its scaling unit (a row, or the tensor) is cut."""
    cut = rows_cut if recipe.granularity == "rowwise" else tensor_cut
    return reduce_amax if cut else None


def _weight_rows(w_EOK: torch.Tensor, dtype, recipe: Fp8Recipe, reduce: AmaxReduce):
    """Quantize ``[E, O, K]`` (or ``[O, K]``) weights along K: scales ``[E, O]``, tensorwise per matrix."""
    shape = w_EOK.shape
    rows = w_EOK.reshape(-1, shape[-1])
    groups: RowGroups = None
    if w_EOK.dim() == 3:
        groups = (torch.arange(shape[0], device=w_EOK.device).repeat_interleave(shape[1]), shape[0])
    q, s = quantize(rows, dtype, recipe.granularity, reduce, groups)
    return q.view(shape), s.view(shape[:-1])


def _weight_transposed(w_EOK: torch.Tensor, dtype, recipe: Fp8Recipe, reduce: AmaxReduce):
    """The backward's copy: ``W^T`` quantized along O, ``[E, K, O]`` with scales ``[E, K]`` (or
    ``[K, O]`` and ``[K]`` for a 2-D weight), read straight from ``W``."""
    q, s = quantize_transposed(w_EOK if w_EOK.dim() == 3 else w_EOK[None], dtype, recipe.granularity, reduce)
    return (q, s) if w_EOK.dim() == 3 else (q[0], s[0])


def scaled_mm(a_q, a_scale_inv, b_q, b_scale_inv, out_dtype, fast_accum: bool) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)^T`` for FP8 ``a`` [M, K] and ``b`` [N, K], rowwise scales."""
    if out_dtype == torch.float64:
        # float64 runs (the parity tests): torch's _scaled_mm would sum in float32, and layouts
        # that sum in another order would then differ by enough to flip a later FP8 rounding.
        # The dequantized operands are exact in float64, so this is the same product.
        return dequantize(a_q, a_scale_inv, torch.float64) @ dequantize(b_q, b_scale_inv, torch.float64).t()
    return torch._scaled_mm(a_q, b_q.t(), a_scale_inv[:, None], b_scale_inv[None, :], out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def scaled_grouped_mm(a_q, a_scale_inv, b_q_EOK, b_scale_inv_EO, offsets, out_dtype, fast_accum: bool):
    """Per expert e, rows ``offsets[e-1]:offsets[e]`` of ``a`` times ``b[e]^T``: [N, O]."""
    if a_q.is_cuda:
        return torch._scaled_grouped_mm(a_q, b_q_EOK.transpose(-2, -1), a_scale_inv, b_scale_inv_EO, offs=offsets,
                                        out_dtype=out_dtype, use_fast_accum=fast_accum)
    out = torch.zeros(a_q.shape[0], b_q_EOK.shape[1], dtype=out_dtype, device=a_q.device)
    bounds = [0] + offsets.tolist()  # host sync: the CPU path loops over the experts
    for e in range(b_q_EOK.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = scaled_mm(a_q[lo:hi], a_scale_inv[lo:hi], b_q_EOK[e], b_scale_inv_EO[e], out_dtype,
                                   fast_accum)
    return out


def grouped_weight_grad(dy_NO: torch.Tensor, x_NK: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, O, K], contiguous like the weight: each expert's ``dy_e^T x_e`` in the activations'
    dtype. (A transposed result would make the main-gradient copy a strided one: ~11 ms per
    step on the V2-Lite proxy.)"""
    if dy_NO.is_cuda and dy_NO.dtype == torch.bfloat16:
        return torch._grouped_mm(dy_NO.t(), x_NK, offs=offsets)
    bounds = [0] + offsets.tolist()
    return torch.stack([dy_NO[lo:hi].t() @ x_NK[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])])


# ---------------------------------------------------------------------------------------------
# dense


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, recipe: Fp8Recipe, cache: Fp8WeightCache, cut: Cut, reduce_amax: AmaxReduce):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize(x2, E4M3, recipe.granularity, _reduce_for(cut == "in", cut == "in", recipe, reduce_amax))
        w_reduce = reduce_amax if weight_unit_is_cut(recipe, cut) else None
        wq, ws = cache.get(weight, "w", lambda: _weight_rows(weight.detach(), E4M3, recipe, w_reduce))
        y = scaled_mm(xq, xs, wq, ws, x.dtype, fast_accum=True)
        ctx.save_for_backward(x2, weight)
        ctx.recipe, ctx.cache, ctx.cut, ctx.reduce_amax, ctx.x_shape = recipe, cache, cut, reduce_amax, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        recipe, cut, reduce_amax = ctx.recipe, ctx.cut, ctx.reduce_amax
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dq, ds = quantize(dy2, recipe.grad_dtype, recipe.granularity,
                              _reduce_for(cut == "out", cut == "out", recipe, reduce_amax))
            wt_reduce = _reduce_for(cut == "out", cut is not None, recipe, reduce_amax)
            wtq, wts = ctx.cache.get(weight, "wt", lambda: _weight_transposed(weight.detach(), E4M3, recipe, wt_reduce))
            dx = scaled_mm(dq, ds, wtq, wts, dy.dtype, fast_accum=False).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = (dy2.t() @ x2).to(weight.dtype)
        return dx, dw, None, None, None, None


# Under ``--compile`` both entry points run eagerly, between two graphs: the weight cache keys on
# the weight's storage and version, which dynamo cannot trace (it would break the graph inside
# the autograd function and retry it on every call), and the GEMMs and Triton casts gain nothing
# from Inductor.
@eager_under_compile
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, cache: Fp8WeightCache, cut: Cut = None,
               reduce_amax: AmaxReduce = None) -> torch.Tensor:
    """``x W^T`` through FP8 GEMMs (see the module docstring)."""
    return _Fp8Linear.apply(x, weight, recipe, cache, cut, reduce_amax)


# ---------------------------------------------------------------------------------------------
# grouped experts


class GradHandoff:
    """A gradient quantized by the backward that produced it, for the backward that consumes it.

    The experts' down projection (``swiglu_input``) computes the gradient ``dh`` of the gate/up
    projection's output; quantizing ``dh`` there, in the SwiGLU's backward kernel, saves the
    gate/up backward a pass over it. The handoff holds ``dh`` itself (so its memory cannot be
    reused meanwhile) and gives the FP8 copy only for that very tensor, unchanged: a gradient
    that reaches the gate/up backward otherwise (summed with another path, changed by a hook) is
    quantized there as before."""

    def __init__(self):
        self._grad: Optional[torch.Tensor] = None
        self._key: Optional[tuple] = None
        self._quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def put(self, grad: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._grad, self._key, self._quantized = grad, self._key_of(grad), quantized

    def take(self, grad: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        quantized = self._quantized if self._grad is not None and self._key_of(grad) == self._key else None
        self._grad = self._key = self._quantized = None
        return quantized

    @staticmethod
    def _key_of(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype


def _row_groups(offsets: torch.Tensor, num_rows: int) -> RowGroups:
    """Each row's expert (for per-expert tensorwise scales), from the device-side offsets."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True).long(), offsets.numel()


class _Fp8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, recipe: Fp8Recipe, cache: Fp8WeightCache, cut: Cut,
                reduce_amax: AmaxReduce, swiglu_input: bool, quantized_input, handoff: Optional[GradHandoff]):
        groups = _row_groups(offsets, x.shape[0]) if recipe.granularity == "tensorwise" else None
        if quantized_input is not None:
            xq, xs = quantized_input  # quantized before the exchange, rowwise (FP8 dispatch)
        else:
            x_reduce = _reduce_for(cut == "in", cut == "in", recipe, reduce_amax)
            quant = swiglu_quantize if swiglu_input else quantize
            xq, xs = quant(x, E4M3, recipe.granularity, x_reduce, groups)
        w_reduce = reduce_amax if weight_unit_is_cut(recipe, cut) else None
        wq, ws = cache.get(weight, "w", lambda: _weight_rows(weight.detach(), E4M3, recipe, w_reduce))
        y = scaled_grouped_mm(xq, xs, wq, ws, offsets, x.dtype, fast_accum=True)
        # the weight gradient needs the input: the FP8 rows stand for it when x is a stand-in
        ctx.save_for_backward(*((x,) if quantized_input is None else quantized_input), weight, offsets)
        ctx.recipe, ctx.cache, ctx.cut, ctx.reduce_amax, ctx.swiglu_input = recipe, cache, cut, reduce_amax, swiglu_input
        ctx.groups, ctx.x_dtype, ctx.quantized_input = groups, x.dtype, quantized_input is not None
        ctx.handoff = handoff
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.quantized_input:
            xq, xs, weight, offsets = ctx.saved_tensors
            x = dequantize(xq, xs, ctx.x_dtype)
        else:
            x, weight, offsets = ctx.saved_tensors
        recipe, cut, reduce_amax = ctx.recipe, ctx.cut, ctx.reduce_amax
        dy = dy.contiguous()
        dy_reduce = _reduce_for(cut == "out", cut == "out", recipe, reduce_amax)
        quantized = ctx.handoff.take(dy) if ctx.handoff is not None and not ctx.swiglu_input else None
        dq, ds = quantized or quantize(dy, recipe.expert_grad_dtype, recipe.granularity, dy_reduce, ctx.groups)
        wt_reduce = _reduce_for(cut == "out", cut is not None, recipe, reduce_amax)
        wtq, wts = ctx.cache.get(weight, "wt",
                                 lambda: _weight_transposed(weight.detach(), E4M3, recipe, wt_reduce))
        da = scaled_grouped_mm(dq, ds, wtq, wts, offsets, dy.dtype, fast_accum=False)
        if not ctx.swiglu_input:
            dx, a = da, x
        elif ctx.handoff is not None:
            # the SwiGLU's backward recomputes the activation (in bf16, as the forward quantized
            # it) and quantizes dh for the gate/up projection's backward (see GradHandoff)
            dx, a, *dx_quantized = swiglu_backward_quantize(x, da, recipe.expert_grad_dtype)
            ctx.handoff.put(dx, tuple(dx_quantized))
        else:
            dx, a = swiglu_backward(x, da)
        dw = grouped_weight_grad(dy, a, offsets).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None, None, None, None


@eager_under_compile
def fp8_grouped_linear(x_NK: torch.Tensor, weight_EOK: torch.Tensor, offsets: torch.Tensor, recipe: Fp8Recipe,
                       cache: Fp8WeightCache, cut: Cut = None, reduce_amax: AmaxReduce = None,
                       swiglu_input: bool = False,
                       quantized_input: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                       handoff: Optional[GradHandoff] = None) -> torch.Tensor:
    """Rows grouped by expert (``offsets``: int32 cumulative counts) times their expert's
    ``W^T``, in FP8. ``swiglu_input``: ``x`` is ``[gate | up]`` and the GEMM's input is its
    SwiGLU, fused into the quantization and recomputed in backward (never stored).
    ``quantized_input``: ``x`` already quantized rowwise (values, scale_inv); ``x`` is then a
    stand-in for its shape and gradient, and the weight gradient uses the dequantized rows.
    ``handoff``: one :class:`GradHandoff` given to both GEMMs of a SwiGLU MLP, whose second
    (``swiglu_input``) backward then quantizes the first one's output gradient; only for
    rowwise scales without an amax reduction over ranks (where it is the same quantization)."""
    return _Fp8GroupedLinear.apply(x_NK, weight_EOK, offsets, recipe, cache, cut, reduce_amax, swiglu_input,
                                   quantized_input, handoff)
