"""FP8 quantization for the native (``--transformer-impl local``) FP8 path.

A tensor is quantized row by row: ``q[r] = saturate(x[r] * scale[r])`` in an FP8 dtype, with
``scale[r]`` a power of two chosen so that the row's largest magnitude (its amax) lands at or
just below the format's largest finite value (448 for e4m3, 57344 for e5m2). The GEMMs take the
inverse scales (``scale_inv``, also powers of two, so multiplying by them is exact).

- ``rowwise`` recipe: one scale per row (per token for activations and gradients, per output
  channel for weights), the granularity of ``torch._scaled_grouped_mm``.
- ``tensorwise`` recipe: one scale for the whole tensor (each expert's matrix is its own tensor);
  the rows' amaxes are reduced to one before the scale is taken.

Both are current scaling: the scale comes from the tensor being quantized, so there is no
history to keep, checkpoint or synchronise over data-parallel replicas. Where a row is cut over
ranks (a row-parallel layer's input is cut along its features over TP), ``reduce_amax`` makes the
row's amax the maximum over the ranks, so every rank quantizes exactly as one GPU would.

Per-expert tensorwise scaling (``row_group``): the grouped experts' activations take one scale
per expert, over that expert's rows, so the scales do not depend on which rank holds the expert.

On CUDA the row kernels are Triton (one pass computing the amax, one writing the FP8 values;
the row stays in cache between them); elsewhere the torch versions do the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from megamoe.numerics import upcast

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

Granularity = Literal["rowwise", "tensorwise", "delayed", "blockwise"]  # the last two: TE only
AmaxReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]  # in-place max over the ranks sharing a row

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
FP8_ALIGNMENT = 16  # FP8 GEMMs (torch's and TE's) need their dimensions in multiples of 16


@dataclass(frozen=True)
class Fp8Recipe:
    """How one layer's GEMMs run in FP8. ``fmt``: ``e4m3`` everywhere, or ``hybrid`` (e4m3
    activations and weights, e5m2 gradients, whose range matters more than their precision).
    ``granularity``: the scaling recipe; the native kernels here run ``rowwise`` and
    ``tensorwise``, Transformer Engine (``megamoe/extensions/te.py``) runs ``delayed``,
    ``tensorwise`` and ``blockwise``. ``transformer_engine``: the dense linears run TE's FP8
    GEMMs (``--transformer-impl transformer_engine``); the experts' backend is their own flag.
    ``amax_history_len`` / ``amax_compute_algo``: the delayed recipe's scaling history.
    ``tp_only_amax_reduction``: the delayed recipe reduces its amaxes over each layer's own
    tensor-parallel group only (``--tp-only-amax-red``), not over the pipeline stage.
    ``te_amax_group``: the group TE's delayed scaling reduces every amax over (a
    :class:`megamoe.parallel.state.Group`, set by the model that holds the layers; None: each
    layer's own TP group). ``min_linear_size``: see :meth:`linear_pays`."""

    fmt: Literal["e4m3", "hybrid"]
    granularity: Granularity
    transformer_engine: bool = False
    amax_history_len: int = 1
    amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    tp_only_amax_reduction: bool = False
    te_amax_group: Optional[object] = field(default=None, compare=False, repr=False)
    min_linear_size: int = 0  # --fp8-min-linear-size: smaller dense linears stay in bf16 (linear_pays)

    def linear_pays(self, out_features: int, in_features: int) -> bool:
        """Whether a dense ``[out, in]`` GEMM runs in FP8 under ``--fp8-min-linear-size``: its
        ``out x in / (out + in)``, half the FLOPs per element of activation it quantizes (input
        forward, output gradient backward), reaches the threshold. The routed experts are not
        dense linears: their quantization is fused with the SwiGLU and the grouped GEMM."""
        return out_features * in_features >= self.min_linear_size * (out_features + in_features)

    @property
    def forward_dtype(self) -> torch.dtype:
        return E4M3

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.fmt == "hybrid" else E4M3

    @property
    def expert_grad_dtype(self) -> torch.dtype:
        """The experts' gradients are e4m3 under both formats: ``torch._scaled_grouped_mm`` takes
        e4m3 operands only (its left operand, the gradient, would be e5m2 under ``hybrid``)."""
        return E4M3


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The power of two that maps ``amax`` to at most the format's maximum (1 for a zero row)."""
    amax = amax.float()
    exponent = torch.floor(torch.log2(FP8_MAX[dtype] / amax.clamp(min=torch.finfo(torch.float32).tiny)))
    return torch.where(amax > 0, torch.exp2(exponent.clamp(max=127.0)), torch.ones_like(amax))


def _quantize_torch(x_RC: torch.Tensor, dtype: torch.dtype, amax_R: Optional[torch.Tensor]):
    if amax_R is None:
        amax_R = x_RC.abs().amax(dim=1).float()
    scale = scale_from_amax(amax_R, dtype)
    limit = FP8_MAX[dtype]
    q = (x_RC.float() * scale[:, None]).clamp(-limit, limit).to(dtype)
    return q, scale.reciprocal()


def row_amax(x_RC: torch.Tensor) -> torch.Tensor:
    """[R] float32: each row's largest magnitude."""
    if _use_triton(x_RC):
        return _triton_row_amax(x_RC)
    return x_RC.abs().amax(dim=1).float() if x_RC.shape[1] else x_RC.new_zeros(x_RC.shape[0], dtype=torch.float32)


RowGroups = Optional[tuple[torch.Tensor, int]]  # (group of each row [R] int64, number of groups)


def _tensor_amax(amax_R: torch.Tensor, row_group: RowGroups) -> torch.Tensor:
    """The amax of each group of rows ([G]), or of all of them ([1])."""
    if row_group is None:
        return amax_R.amax(dim=0, keepdim=True) if amax_R.numel() else amax_R.new_zeros(1)
    group_R, num_groups = row_group
    return amax_R.new_zeros(num_groups).scatter_reduce_(0, group_R, amax_R, "amax")


def _rows_of(amax_G: torch.Tensor, row_group: RowGroups, num_rows: int) -> torch.Tensor:
    return amax_G.expand(num_rows).contiguous() if row_group is None else amax_G[row_group[0]]


def quantize(x_RC: torch.Tensor, dtype: torch.dtype, granularity: Granularity = "rowwise",
             reduce_amax: AmaxReduce = None, row_group: RowGroups = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values [R, C], scale_inv [R] float32) of a 2-D tensor, row by row.

    ``tensorwise``: every row gets the scale of the whole tensor, or of its group of rows
    (``row_group``). ``reduce_amax``: the amaxes are first reduced (a max) over the ranks holding
    the other pieces of each row (or tensor).
    """
    x_RC = x_RC.contiguous()
    amax = None
    if granularity == "tensorwise" or reduce_amax is not None:
        amax = row_amax(x_RC)
        if granularity == "tensorwise":
            amax = _tensor_amax(amax, row_group)
        if reduce_amax is not None:
            amax = reduce_amax(amax)
        if granularity == "tensorwise":
            amax = _rows_of(amax, row_group, x_RC.shape[0])
    return _quantize_rows(x_RC, dtype, amax)


def _quantize_rows(x_RC: torch.Tensor, dtype: torch.dtype, amax_R: Optional[torch.Tensor]):
    if _use_triton(x_RC):
        return _triton_quantize(x_RC, dtype, amax_R)
    return _quantize_torch(x_RC, dtype, amax_R)


def quantize_with_amax(x_RC: torch.Tensor, dtype: torch.dtype, amax_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values, scale_inv) of each row of ``x`` at the scale of its given amax (taken
    elsewhere: over the ranks holding parts of the row, or over the rows of a matrix)."""
    return _quantize_rows(x_RC.contiguous(), dtype, amax_R.float().contiguous())


def quantize_transposed(x_BRC: torch.Tensor, dtype: torch.dtype, granularity: Granularity = "rowwise",
                        reduce_amax: AmaxReduce = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values [B, C, R], scale_inv [B, C]): each matrix's transpose ``x[b]^T`` quantized row
    by row, as :func:`quantize` would quantize it, without writing the transpose in ``x``'s dtype
    first (a weight's backward copy: the strided copy cost ~11 ms per step on the V2-Lite proxy).
    ``tensorwise``: one scale per matrix. ``reduce_amax`` as in :func:`quantize`."""
    x_BRC = x_BRC.contiguous()
    B, R, C = x_BRC.shape
    amax = None
    if granularity == "tensorwise" or reduce_amax is not None:
        amax = x_BRC.abs().amax(dim=1).float() if R else x_BRC.new_zeros(B, C, dtype=torch.float32)
        if granularity == "tensorwise":
            amax = amax.amax(dim=1, keepdim=True) if C else amax.new_zeros(B, 1)
        if reduce_amax is not None:
            amax = reduce_amax(amax)
        amax = amax.expand(B, C).contiguous()
    if _use_triton(x_BRC):
        return _triton_quantize_transposed(x_BRC, dtype, amax)
    q, scale_inv = _quantize_torch(x_BRC.transpose(1, 2).reshape(B * C, R), dtype,
                                   None if amax is None else amax.reshape(-1))
    return q.view(B, C, R), scale_inv.view(B, C)


def swiglu(h_RC: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the ``[gate | up]`` halves, computed in (at least) float32, in ``h``'s dtype."""
    gate, up = upcast(h_RC).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h_RC.dtype)


def swiglu_quantize(h_RC: torch.Tensor, dtype: torch.dtype, granularity: Granularity = "rowwise",
                    reduce_amax: AmaxReduce = None, row_group: RowGroups = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(swiglu(h))`` without writing ``swiglu(h)`` to memory: one Triton kernel on CUDA
    for rowwise scales without a reduction (silu in float32 there and here, so the two can
    differ by float32 rounding before the activation is rounded to ``h``'s dtype)."""
    if _use_triton(h_RC) and granularity == "rowwise" and reduce_amax is None:
        return _triton_swiglu_quantize(h_RC.contiguous(), dtype)
    return quantize(swiglu(h_RC), dtype, granularity, reduce_amax, row_group)


def swiglu_backward(h_RC: torch.Tensor, da_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, a): the gradient of :func:`swiglu` at ``h`` for the output gradient ``da``, and the
    activation ``a = swiglu(h)`` recomputed on the way (the weight gradient needs it). One Triton
    kernel on CUDA; torch's autograd of :func:`swiglu` elsewhere."""
    if _use_triton(h_RC):
        return _triton_swiglu_backward(h_RC.contiguous(), da_RF.contiguous())
    with torch.enable_grad():
        h = h_RC.detach().requires_grad_()
        a = swiglu(h)
    (dh,) = torch.autograd.grad(a, h, da_RF)
    return dh, a.detach()


def swiglu_backward_quantize(h_RC: torch.Tensor, da_RF: torch.Tensor, dtype: torch.dtype):
    """(dh, a, dh's FP8 values, dh's scale_inv): :func:`swiglu_backward` and the rowwise
    quantization of its ``dh`` (no amax reduction), as ``quantize(dh, dtype)`` would give it.
    On CUDA one Triton kernel holds each row's ``dh`` in registers from the SwiGLU's backward
    to its quantization, so ``dh`` is written once and not read back."""
    if _use_triton(h_RC):
        return _triton_swiglu_backward_quantize(h_RC.contiguous(), da_RF.contiguous(), dtype)
    dh, a = swiglu_backward(h_RC, da_RF)
    return (dh, a, *quantize(dh, dtype))


def dequantize(q_RC: torch.Tensor, scale_inv_R: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q_RC.float() * scale_inv_R.float()[:, None]).to(dtype)


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# ---------------------------------------------------------------------------------------------
# Triton versions

if triton is not None:

    @triton.jit
    def _pow2_scale(amax, FP8_MAX: tl.constexpr):
        # the largest power of two s with amax * s <= FP8_MAX; 1 for a zero row
        safe = tl.maximum(amax, 1.1754943508222875e-38)
        exponent = tl.minimum(tl.floor(tl.log2(FP8_MAX / safe)), 127.0)
        return tl.where(amax > 0, tl.exp2(exponent), 1.0)

    @triton.jit
    def _saturate(v, FP8_MAX: tl.constexpr):
        # a scaled value clamped to the format's finite range, for the store's cast
        return tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)

    @triton.jit
    def _swiglu_grads(g, u, da):
        # float32 (a, d gate, d up) of a = silu(g) * u for the output gradient da
        s = tl.sigmoid(g)
        silu = g * s
        return silu * u, da * u * (s * (1.0 + g * (1.0 - s))), da * silu

    @triton.jit
    def _row_amax_kernel(x_ptr, out_ptr, C, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + r * C + offs, mask=offs < C, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
        tl.store(out_ptr + r, tl.max(acc, axis=0))

    @triton.jit
    def _quantize_kernel(x_ptr, amax_ptr, q_ptr, scale_inv_ptr, C, HAS_AMAX: tl.constexpr,
                         FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        if HAS_AMAX:
            amax = tl.load(amax_ptr + r)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                v = tl.load(x_ptr + r * C + offs, mask=offs < C, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(v))
            amax = tl.max(acc, axis=0)
        scale = _pow2_scale(amax, FP8_MAX)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < C
            v = tl.load(x_ptr + r * C + offs, mask=mask, other=0.0).to(tl.float32)
            v = _saturate(v * scale, FP8_MAX)
            tl.store(q_ptr + r * C + offs, v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + r, 1.0 / scale)

    @triton.jit
    def _quantize_tile_kernel(x_ptr, amax_ptr, q_ptr, scale_inv_ptr, R, C, HAS_AMAX: tl.constexpr,
                              FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        # ROWS whole rows (C <= BLOCK_C) per program, read once and kept in registers between
        # the amax and the scaled write (the row loop above reads each row twice)
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_AMAX:
            amax = tl.load(amax_ptr + rows, mask=rows < R, other=0.0)
        else:
            amax = tl.max(tl.abs(v), axis=1)
        scale = _pow2_scale(amax, FP8_MAX)
        v = _saturate(v * scale[:, None], FP8_MAX)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + rows, 1.0 / scale, mask=rows < R)

    @triton.jit
    def _quantize_transposed_kernel(x_ptr, amax_ptr, q_ptr, scale_inv_ptr, R, C, HAS_AMAX: tl.constexpr,
                                    FP8_MAX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        # a block of BC columns of matrix b: their amax down the R rows, then the scaled
        # values written as rows of the transpose
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        col_mask = cols < C
        x_ptr += b * R * C
        q_ptr += b * R * C
        if HAS_AMAX:
            amax = tl.load(amax_ptr + b * C + cols, mask=col_mask, other=0.0)
        else:
            acc = tl.zeros([BR, BC], dtype=tl.float32)
            for start in range(0, R, BR):
                rows = start + tl.arange(0, BR)
                mask = (rows[:, None] < R) & col_mask[None, :]
                v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(v))
            amax = tl.max(acc, axis=0)
        scale = _pow2_scale(amax, FP8_MAX)
        for start in range(0, R, BR):
            rows = start + tl.arange(0, BR)
            mask = (rows[:, None] < R) & col_mask[None, :]
            v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = _saturate(v * scale[None, :], FP8_MAX)
            tl.store(q_ptr + cols[None, :] * R + rows[:, None], v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + b * C + cols, 1.0 / scale, mask=col_mask)

    @triton.jit
    def _swiglu_block(h_ptr, r, C, offs, mask):
        # one block of row r's activation from h = [gate (C) | up (C)], rounded to h's dtype as
        # the unfused path rounds it, then back to float32
        g = tl.load(h_ptr + r * 2 * C + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + r * 2 * C + C + offs, mask=mask, other=0.0).to(tl.float32)
        return (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _swiglu_quantize_kernel(h_ptr, q_ptr, scale_inv_ptr, C, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < C
            a = _swiglu_block(h_ptr, r, C, offs, mask)
            acc = tl.maximum(acc, tl.abs(a))
        scale = _pow2_scale(tl.max(acc, axis=0), FP8_MAX)
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < C
            a = _swiglu_block(h_ptr, r, C, offs, mask)
            a = _saturate(a * scale, FP8_MAX)
            tl.store(q_ptr + r * C + offs, a.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + r, 1.0 / scale)

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, da_ptr, dh_ptr, a_ptr, C, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < C
        g = tl.load(h_ptr + r * 2 * C + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + r * 2 * C + C + offs, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + r * C + offs, mask=mask, other=0.0).to(tl.float32)
        a, dg, du = _swiglu_grads(g, u, da)
        tl.store(a_ptr + r * C + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + r * 2 * C + offs, dg.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + r * 2 * C + C + offs, du.to(dh_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _swiglu_backward_quantize_kernel(h_ptr, da_ptr, dh_ptr, a_ptr, q_ptr, scale_inv_ptr, R, C,
                                         FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        # the SwiGLU's backward on ROWS whole rows, then dh quantized from its
        # rounded values (as quantize(dh) reads them) while they are still in registers
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        gate_at = rows[:, None] * 2 * C + cols[None, :]
        g = tl.load(h_ptr + gate_at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + gate_at + C, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a, dg, du = _swiglu_grads(g, u, da)
        tl.store(a_ptr + rows[:, None] * C + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)
        dg, du = dg.to(dh_ptr.dtype.element_ty), du.to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + gate_at, dg, mask=mask)
        tl.store(dh_ptr + gate_at + C, du, mask=mask)
        dg, du = dg.to(tl.float32), du.to(tl.float32)
        scale = _pow2_scale(tl.maximum(tl.max(tl.abs(dg), axis=1), tl.max(tl.abs(du), axis=1)), FP8_MAX)
        dg = _saturate(dg * scale[:, None], FP8_MAX)
        du = _saturate(du * scale[:, None], FP8_MAX)
        tl.store(q_ptr + gate_at, dg.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + gate_at + C, du.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_inv_ptr + rows, 1.0 / scale, mask=rows < R)


_BLOCK = 1024


def _triton_row_amax(x_RC):
    R, C = x_RC.shape
    out = torch.empty(R, dtype=torch.float32, device=x_RC.device)
    if R:
        _row_amax_kernel[(R,)](x_RC, out, C, BLOCK=_BLOCK)
    return out


# Rows up to this long are quantized whole, several per program (_quantize_tile_kernel), in
# tiles of about _TILE_ELEMENTS values and _TILE_WARPS warps; longer rows loop (_quantize_kernel).
# Measured on one H200 (2026-12-05, 196,608 bf16 rows; the row loop in brackets): 0.332 ms
# (0.362) at 2048 columns, 0.441 (0.493) at 2816, 0.260 (0.353) at 1408; 8192 values and 8
# warps were slower at every width.
_TILE_MAX_C, _TILE_ELEMENTS, _TILE_WARPS = 8192, 4096, 4


def _triton_quantize(x_RC, dtype, amax_R):
    R, C = x_RC.shape
    q = torch.empty(R, C, dtype=dtype, device=x_RC.device)
    scale_inv = torch.empty(R, dtype=torch.float32, device=x_RC.device)
    if R:
        amax = amax_R.contiguous() if amax_R is not None else scale_inv  # unused pointer without HAS_AMAX
        if 0 < C <= _TILE_MAX_C:
            block_c = triton.next_power_of_2(C)
            rows = max(1, _TILE_ELEMENTS // block_c)
            _quantize_tile_kernel[(triton.cdiv(R, rows),)](x_RC, amax, q, scale_inv, R, C, HAS_AMAX=amax_R is not None,
                                                           FP8_MAX=FP8_MAX[dtype], ROWS=rows, BLOCK_C=block_c,
                                                           num_warps=_TILE_WARPS)
        else:
            _quantize_kernel[(R,)](x_RC, amax, q, scale_inv, C, HAS_AMAX=amax_R is not None, FP8_MAX=FP8_MAX[dtype],
                                   BLOCK=_BLOCK)
    return q, scale_inv


def _triton_quantize_transposed(x_BRC, dtype, amax_BC):
    B, R, C = x_BRC.shape
    q = torch.empty(B, C, R, dtype=dtype, device=x_BRC.device)
    scale_inv = torch.empty(B, C, dtype=torch.float32, device=x_BRC.device)
    if B and R and C:
        amax = amax_BC if amax_BC is not None else scale_inv  # unused pointer without HAS_AMAX
        grid = (triton.cdiv(C, 64), B)
        _quantize_transposed_kernel[grid](x_BRC, amax, q, scale_inv, R, C, HAS_AMAX=amax_BC is not None,
                                          FP8_MAX=FP8_MAX[dtype], BR=64, BC=64)
    elif B and C:
        scale_inv.fill_(1.0)  # no rows: each (empty) row of the transpose has amax 0, scale 1
    return q, scale_inv


def _triton_swiglu_quantize(h_RC, dtype):
    R, C2 = h_RC.shape
    C = C2 // 2
    q = torch.empty(R, C, dtype=dtype, device=h_RC.device)
    scale_inv = torch.empty(R, dtype=torch.float32, device=h_RC.device)
    if R:
        _swiglu_quantize_kernel[(R,)](h_RC, q, scale_inv, C, FP8_MAX=FP8_MAX[dtype], BLOCK=_BLOCK)
    return q, scale_inv


def _triton_swiglu_backward(h_RC, da_RF):
    R, C2 = h_RC.shape
    C = C2 // 2
    dh = torch.empty_like(h_RC)
    a = torch.empty(R, C, dtype=h_RC.dtype, device=h_RC.device)
    if R:
        _swiglu_backward_kernel[(R, triton.cdiv(C, _BLOCK))](h_RC, da_RF, dh, a, C, BLOCK=_BLOCK)
    return dh, a


def _triton_swiglu_backward_quantize(h_RC, da_RF, dtype):
    R, C2 = h_RC.shape
    C = C2 // 2
    dh, q = torch.empty_like(h_RC), torch.empty(R, C2, dtype=dtype, device=h_RC.device)
    a = torch.empty(R, C, dtype=h_RC.dtype, device=h_RC.device)
    scale_inv = torch.empty(R, dtype=torch.float32, device=h_RC.device)
    if R and C <= _TILE_MAX_C // 2:
        block_c = triton.next_power_of_2(C)
        rows = max(1, _TILE_ELEMENTS // (2 * block_c))
        _swiglu_backward_quantize_kernel[(triton.cdiv(R, rows),)](h_RC, da_RF, dh, a, q, scale_inv, R, C,
                                                                  FP8_MAX=FP8_MAX[dtype], ROWS=rows, BLOCK_C=block_c,
                                                                  num_warps=_TILE_WARPS)
    elif R:  # rows too long to hold: the two kernels
        dh, a = _triton_swiglu_backward(h_RC, da_RF)
        q, scale_inv = _triton_quantize(dh, dtype, None)
    return dh, a, q, scale_inv
