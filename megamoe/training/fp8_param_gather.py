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
import torch.nn.functional as F

from megamoe.kernels.fp8 import E4M3, FP8_MAX, scale_from_amax
from megamoe.kernels.fp8_gemm import fp8_weight_recipe
from megamoe.parallel import mappings
from megamoe.parallel.data_parallel import Bucket
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import Group, ParallelState


@dataclass
class _Weight:
    """One FP8 weight of a bucket: its offsets there, its scaling units (``unit`` consecutive
    elements each, ``first`` the index of its first one in the bucket's amax vector) and
    whether the units are cut over its tensor-parallel group."""

    param: torch.nn.Parameter
    lo: int
    hi: int
    unit: int
    first: int
    cut: bool

    @property
    def num_units(self) -> int:
        return (self.hi - self.lo) // self.unit


def scaling_unit(param: torch.nn.Parameter) -> tuple[int, bool]:
    """(elements per scale, whether the layer's tensor-parallel cut splits a unit) of an FP8
    weight ``[O, K]`` or ``[E, O, K]``: a row (``rowwise``, cut when K is) or a matrix
    (``tensorwise``, cut when either is)."""
    recipe = fp8_weight_recipe(param)
    spec = spec_of(param)
    last = len(spec.shape) - 1
    if recipe.granularity == "rowwise":
        return param.shape[-1], spec.split_at(last) is not None
    return param.shape[-1] * param.shape[-2], any(spec.split_at(d) is not None for d in (last - 1, last))


class Fp8BucketGather:
    """The FP8 all-gather of one bucket of FP8 weights (see the module docstring)."""

    def __init__(self, bucket: Bucket, state: ParallelState):
        self.bucket = bucket
        self.weights: list[_Weight] = []
        units = 0
        for p, lo, hi in bucket.ranges:
            unit, cut = scaling_unit(p)
            self.weights.append(_Weight(p, lo, hi, unit, units, cut))
            units += self.weights[-1].num_units
        self.num_units = units
        expert = spec_of(bucket.params[0]).is_expert
        self.tp_group: Group = state.etp if expert else state.tp
        cut = [torch.arange(w.first, w.first + w.num_units) for w in self.weights if w.cut]
        self._cut_units = torch.cat(cut).to(bucket.grad_data.device) if cut and self.tp_group.size > 1 else None
        self._scale_inv: Optional[torch.Tensor] = None

    def _segments(self, pieces):
        """(weight, master values, first unit, elements of the first unit before the piece)
        of each of this rank's pieces."""
        by_param = {w.param: w for w in self.weights}
        for x in pieces:
            w = by_param[x.param]
            first, head = divmod(x.lo - w.lo, w.unit)
            yield w, x.master.reshape(-1), first, head

    @staticmethod
    def _units(values: torch.Tensor, unit: int, head: int) -> torch.Tensor:
        """``values`` padded with zeros to whole units: ``[units, unit]``."""
        tail = -(head + values.numel()) % unit
        return F.pad(values, (head, tail)).view(-1, unit)

    @torch.no_grad()
    def quantize_shard(self, pieces) -> torch.Tensor:
        """This rank's shard of the bucket as e4m3 bytes (uint8), from the pieces' masters;
        collective over the bucket's group (and the tensor-parallel group): the amaxes."""
        device = self.bucket.grad_data.device
        amax = torch.zeros(self.num_units, dtype=torch.float32, device=device)
        segments = list(self._segments(pieces))
        for w, values, first, head in segments:
            part = self._units(values.abs(), w.unit, head).amax(dim=1).float()
            lo = w.first + first
            amax[lo:lo + part.numel()] = part
        mappings.all_reduce_(amax, self.bucket.group, torch.distributed.ReduceOp.MAX)
        if self._cut_units is not None:
            cut = amax[self._cut_units]
            amax[self._cut_units] = mappings.all_reduce_(cut, self.tp_group, torch.distributed.ReduceOp.MAX)
        scale = scale_from_amax(amax, E4M3)
        self._scale_inv = scale.reciprocal()
        send = torch.zeros(self.bucket.shard_size, dtype=torch.uint8, device=device)
        limit = FP8_MAX[E4M3]
        for w, values, first, head in segments:
            n = values.numel()
            units = self._units(values, w.unit, head)
            lo = w.first + first
            q = (units * scale[lo:lo + units.shape[0], None].to(values.dtype)).clamp(-limit, limit).to(E4M3)
            start = w.lo + first * w.unit + head - self.bucket.shard_start
            send[start:start + n] = q.view(-1)[head:head + n].view(torch.uint8)
        return send

    @torch.no_grad()
    def write_params(self, gathered: torch.Tensor) -> None:
        """Every FP8 weight of the bucket, dequantized from the gathered bytes."""
        for w in self.weights:
            q = gathered[w.lo:w.hi].view(E4M3).view(w.num_units, w.unit)
            scale_inv = self._scale_inv[w.first:w.first + w.num_units, None]
            values = q.to(torch.float64 if w.param.dtype == torch.float64 else torch.float32) * scale_inv
            w.param.data.view(w.num_units, w.unit).copy_(values)


def fp8_bucket_gathers(buckets: list[Bucket], state: ParallelState) -> dict[Bucket, Fp8BucketGather]:
    """The FP8 gathers of the buckets that hold FP8 weights (all of their weights are)."""
    return {b: Fp8BucketGather(b, state) for b in buckets if fp8_weight_recipe(b.params[0]) is not None}
