"""``--fp8-param-gather``: the distributed optimizer all-gathers the FP8 weights in FP8.

Without it, every rank quantizes its bf16 copy of each FP8 weight (``kernels/fp8_gemm.py``)
after the distributed optimizer has all-gathered that copy in bf16. With it, each rank
quantizes its shard of the float32 masters, the bucket is all-gathered as one byte per element
(half the bf16 gather's bytes), and every rank writes the dequantized values into its
parameters. The weights the model holds are then exactly FP8 values times their scales:

- the scaling unit is the recipe's: one scale per row of a weight (``rowwise``: per output
  channel, each expert's rows on their own) or per matrix (``tensorwise``: each expert's matrix
  on its own). Its amax is the largest magnitude of the unit's master values, reduced (a max)
  over the ranks whose shards hold part of the unit (the bucket's data-parallel group) and,
  where the layer's tensor-parallel cut splits the unit, over that group (``tp``, or ``etp``
  for the experts), so every layout quantizes exactly as one process would;
- the scale is the power of two of ``kernels/fp8.py`` (``scale_from_amax``), e4m3;
- a dequantized e4m3 value times a power of two is exact in bf16, and re-quantizing it with the
  forward's own recipe gives back the same product (its amax lands in the same power of two,
  or an exact doubling): the GEMMs' weight cache quantizes the parameter as before, and
  computes exactly the FP8 GEMM of the gathered weight.

The masters stay float32 and keep the updates below FP8's resolution; only what the forward
sees is quantized, as in Megatron-LM's ``--fp8-param-gather``. The parameters keep their bf16
storage (the backward's main-gradient hooks and the checkpoints read it), so the memory is
unchanged: the saving is the gather's bytes, half of bf16's for every FP8 weight.

FP8 weights (marked by their layer, ``kernels/fp8_gemm.mark_fp8_weight``) fill buffers of
their own (``data_parallel.buffer_groups``), so an FP8 bucket holds FP8 weights only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed import ReduceOp

from megamoe.kernels.fp8 import E4M3, quantize_with_amax, row_amax, scale_from_amax
from megamoe.kernels.fp8_gemm import fp8_weight_recipe, weight_unit_is_cut
from megamoe.parallel import mappings
from megamoe.parallel.data_parallel import Bucket
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import Group, ParallelState


@dataclass
class _Weight:
    """One FP8 weight of a bucket, as rows of ``row`` elements (its last dimension): its
    offsets there, ``rows_per_unit`` rows per scale, the index of its first row in the
    bucket's rows and whether the layer's tensor-parallel cut splits its units."""

    param: torch.nn.Parameter
    lo: int
    hi: int
    row: int
    rows_per_unit: int
    first_row: int
    cut: bool

    @property
    def num_rows(self) -> int:
        return (self.hi - self.lo) // self.row


def scaling_unit(param: torch.nn.Parameter) -> tuple[int, bool]:
    """(rows per scale, whether the layer's tensor-parallel cut splits a unit) of an FP8 weight
    ``[O, K]`` or ``[E, O, K]``: one row (``rowwise``) or one matrix of O rows (``tensorwise``),
    cut as the layer's own quantization sees it (``fp8_gemm.weight_unit_is_cut``)."""
    recipe = fp8_weight_recipe(param)
    rows_per_unit = 1 if recipe.granularity == "rowwise" else param.shape[-2]
    return rows_per_unit, weight_unit_is_cut(recipe, param.fp8_cut)


def _spans(a: int, b: int, row: int) -> list[tuple[int, int, int, int]]:
    """The rows that elements ``[a, b)`` of a weight of ``row``-element rows touch: ``(first
    row, rows, offset in the piece, elements)``, the whole rows together, a partial row alone."""
    spans, pos = [], a
    if pos % row:
        n = min(row - pos % row, b - pos)
        spans.append((pos // row, 1, 0, n))
        pos += n
    whole = (b - pos) // row
    if whole:
        spans.append((pos // row, whole, pos - a, whole * row))
        pos += whole * row
    if pos < b:
        spans.append((pos // row, 1, pos - a, b - pos))
    return spans


class Fp8BucketGather:
    """The FP8 all-gather of one bucket of FP8 weights (see the module docstring). The work is
    done row by row (Triton kernels on CUDA: one pass for the amaxes, one for the values), each
    row's amax then reduced to its unit's."""

    def __init__(self, bucket: Bucket, state: ParallelState):
        self.bucket = bucket
        self.weights: list[_Weight] = []
        rows = units = 0
        unit_of_row = []
        for p, lo, hi in bucket.ranges:
            per_unit, cut = scaling_unit(p)
            w = _Weight(p, lo, hi, p.shape[-1], per_unit, rows, cut)
            self.weights.append(w)
            unit_of_row.append(units + torch.arange(w.num_rows) // per_unit)
            rows, units = rows + w.num_rows, units + w.num_rows // per_unit
        device = bucket.grad_data.device
        self.num_rows, self.num_units = rows, units
        self._unit_of_row = torch.cat(unit_of_row).to(device)
        expert = spec_of(bucket.params[0]).is_expert
        self.tp_group: Group = state.etp if expert else state.tp
        cut = [self._unit_of_row[w.first_row:w.first_row + w.num_rows] for w in self.weights if w.cut]
        self._cut_units = torch.cat(cut).unique() if cut and self.tp_group.size > 1 else None
        self._row_scale_inv: Optional[torch.Tensor] = None

    def _spans_of(self, pieces):
        """(weight, first row, rows, master values, offset in the bucket) of each row span of
        this rank's pieces."""
        by_param = {w.param: w for w in self.weights}
        for x in pieces:
            w = by_param[x.param]
            values = x.master.reshape(-1)
            for first, rows, offset, n in _spans(x.lo - w.lo, x.hi - w.lo, w.row):
                yield w, first, rows, values[offset:offset + n], x.lo + offset

    def _amax(self, spans) -> torch.Tensor:
        """Each row's amax, the largest of its unit's, over every rank holding part of it."""
        amax = torch.zeros(self.num_rows, dtype=torch.float32, device=self.bucket.grad_data.device)
        for w, first, rows, values, _ in spans:
            at = w.first_row + first
            if values.numel() == rows * w.row:  # whole rows
                amax[at:at + rows] = row_amax(values.view(rows, w.row))
            else:
                amax[at] = values.abs().max().float()
        mappings.all_reduce_(amax, self.bucket.group, ReduceOp.MAX)
        units = amax.new_zeros(self.num_units).scatter_reduce_(0, self._unit_of_row, amax, "amax")
        if self._cut_units is not None:
            units[self._cut_units] = mappings.all_reduce_(units[self._cut_units], self.tp_group, ReduceOp.MAX)
        return units[self._unit_of_row]

    @torch.no_grad()
    def quantize_shard(self, pieces) -> torch.Tensor:
        """This rank's shard of the bucket as e4m3 bytes (uint8), from the pieces' masters;
        collective over the bucket's group (and the tensor-parallel group): the amaxes."""
        spans = list(self._spans_of(pieces))
        amax = self._amax(spans)
        self._row_scale_inv = scale_from_amax(amax, E4M3).reciprocal()
        send = torch.zeros(self.bucket.shard_size, dtype=torch.uint8, device=amax.device)
        for w, first, rows, values, at in spans:
            row_amax_ = amax[w.first_row + first:w.first_row + first + rows]
            q, _ = quantize_with_amax(values.view(rows, -1), E4M3, row_amax_)
            start = at - self.bucket.shard_start
            send[start:start + values.numel()] = q.view(-1).view(torch.uint8)
        return send

    @torch.no_grad()
    def write_params(self, gathered: torch.Tensor) -> None:
        """Every FP8 weight of the bucket, dequantized from the gathered bytes (exact in the
        parameters' dtype: an e4m3 value times a power of two)."""
        for w in self.weights:
            q = gathered[w.lo:w.hi].view(E4M3).view(w.num_rows, w.row)
            dtype = w.param.dtype
            scale_inv = self._row_scale_inv[w.first_row:w.first_row + w.num_rows, None].to(dtype)
            torch.mul(q.to(dtype), scale_inv, out=w.param.data.view(w.num_rows, w.row))


def fp8_bucket_gathers(buckets: list[Bucket], state: ParallelState) -> dict[Bucket, Fp8BucketGather]:
    """The FP8 gathers of the buckets that hold FP8 weights (all of their weights are)."""
    return {b: Fp8BucketGather(b, state) for b in buckets if fp8_weight_recipe(b.params[0]) is not None}
