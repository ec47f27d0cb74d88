"""Tensor-parallel layers (Megatron split). The vocab-parallel loss is in ``cross_entropy.py``.

Shapes are sequence first: activations are ``[s, b, h]``. With sequence parallel, the
activations between TP regions are sharded along ``s`` (each rank holds ``s / tp`` rows), a
column-parallel layer all-gathers them on entry and a row-parallel layer reduce-scatters on
exit. Without it, activations between regions are replicated.

Each parameter's layout is its ``param.spec`` (:mod:`megamoe.parallel.param_spec`): the
dimension cut over TP, or replicated; replicated parameters fed by sequence-sharded activations
have ``grad_partial_over_tp``: each TP rank holds a partial gradient that must be summed over TP
(see :func:`all_reduce_sequence_parallel_grads`).

Weights are initialised from the full (unsharded) tensor drawn from a generator, then sliced,
so a layout with TP > 1 starts from exactly the weights of the single-process model.

GEMM backend: each linear runs ``F.linear`` (whose weight gradient a zero-bubble pipeline
schedule may defer: ``weight_grad.py``), or with an FP8 recipe (``fp8``, from the precision
policy) the FP8 GEMMs of ``megamoe/kernels/fp8_gemm.py`` or, with ``--transformer-impl
transformer_engine``, TE's (``megamoe/extensions/te.py``). The communication around the GEMM is
the same for all of them; the native FP8 GEMM is told which weight dimension TP cuts, so the
scales of the operands that cut splits are reduced over TP.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megamoe.kernels.fp8 import FP8_ALIGNMENT, AmaxReduce, Fp8Recipe
from megamoe.kernels.fp8_gemm import Cut, Fp8WeightCache, fp8_linear, mark_fp8_weight
from megamoe.parallel import mappings
from megamoe.parallel.param_spec import ParamSpec, Split, set_spec, spec_of
from megamoe.parallel.state import Group
from megamoe.parallel.weight_grad import WeightGradStore, linear

InitFn = Callable[[torch.Tensor, torch.Generator], None]


def normal_init(std: float) -> InitFn:
    """An init function drawing N(0, std^2) from the given generator."""

    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.normal_(0.0, std, generator=generator)

    return init


def init_sharded_(
    param: torch.Tensor,
    full_shape: tuple[int, ...],
    partition_dim: Optional[int],
    group: Optional[Group],
    init_fn: InitFn,
    generator: torch.Generator,
) -> None:
    """Fill ``param`` with this rank's slice of a full tensor drawn by ``init_fn``."""
    full = torch.empty(full_shape, dtype=torch.float32, device=param.device)
    init_fn(full, generator)
    if partition_dim is not None:
        full = full.chunk(group.size, dim=partition_dim)[group.rank]
    with torch.no_grad():
        param.copy_(full)


log = logging.getLogger(__name__)
_warned_fp8_shapes: set[tuple] = set()


def amax_reducer(group: Optional[Group]) -> AmaxReduce:
    """The FP8 amax reduction over ``group`` (a max, in place), or None for a single rank."""
    if group is None or group.size == 1:
        return None
    return lambda amax: mappings.all_reduce_(amax, group, op=dist.ReduceOp.MAX)


def fp8_for_shape(fp8: Optional[Fp8Recipe], out_features: int, in_features: int) -> Optional[Fp8Recipe]:
    """``fp8``, or None (and a notice, once per shape) when the local weight cannot run in FP8."""
    if fp8 is None or (out_features % FP8_ALIGNMENT == 0 and in_features % FP8_ALIGNMENT == 0):
        return fp8
    if (out_features, in_features) not in _warned_fp8_shapes:
        _warned_fp8_shapes.add((out_features, in_features))
        log.warning("a [%d, %d] linear runs in the activations' dtype, not FP8: FP8 GEMMs need dimensions "
                    "that are multiples of %d", out_features, in_features, FP8_ALIGNMENT)
    return None


def fp8_for_linear(fp8: Optional[Fp8Recipe], out_features: int, in_features: int) -> Optional[Fp8Recipe]:
    """A dense linear's recipe: :func:`fp8_for_shape`, and None when the linear is below
    ``--fp8-min-linear-size`` (:meth:`Fp8Recipe.linear_pays`; told once per shape)."""
    if fp8 is None or fp8.linear_pays(out_features, in_features):
        return fp8_for_shape(fp8, out_features, in_features)
    if (out_features, in_features, "size") not in _warned_fp8_shapes:
        _warned_fp8_shapes.add((out_features, in_features, "size"))
        log.info("a [%d, %d] linear runs in the activations' dtype: below --fp8-min-linear-size %d",
                 out_features, in_features, fp8.min_linear_size)
    return None


class _Gemm(nn.Module):
    """The GEMM seam every linear layer shares: ``x W^T`` in the activations' dtype or in FP8."""

    fp8: Optional[Fp8Recipe] = None

    def _setup_gemm(self, fp8: Optional[Fp8Recipe], cut: Cut, group: Optional[Group]) -> None:
        self.fp8 = fp8_for_linear(fp8, *self.weight.shape)
        self._fp8_cut, self._fp8_reduce = cut, amax_reducer(group)
        self._fp8_cache = Fp8WeightCache()
        self._te_gemm = None
        self.wgrad_store: Optional[WeightGradStore] = None  # set by GPTModel.defer_weight_grads
        if self.fp8 is not None and self.fp8.transformer_engine:
            from megamoe.extensions.te import TELinearGemm

            # TE scales each rank's shard on its own (as in Megatron); delayed scaling reduces
            # the amax histories over the recipe's te_amax_group (the stage), else this TP group
            self._te_gemm = TELinearGemm(self.fp8, group)
        elif self.fp8 is not None:
            mark_fp8_weight(self.weight, self.fp8, cut)

    def _gemm(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fp8 is None:
            return linear(x, self.weight, bias, self.wgrad_store)
        if self._te_gemm is not None:
            y = self._te_gemm(x, self.weight)
        else:
            y = fp8_linear(x, self.weight, self.fp8, self._fp8_cache, self._fp8_cut, self._fp8_reduce)
        return y if bias is None else y + bias

    def _fp8_repr(self) -> str:
        return "" if self.fp8 is None else f", fp8={self.fp8.fmt}/{self.fp8.granularity}"


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


class ColumnParallelLinear(_Gemm):
    """``y = x W^T (+ b)`` with ``W`` split along its output dimension over TP.

    Input: replicated ``[s, b, in]`` (or ``[s/tp, b, in]`` with sequence parallel).
    Output: this rank's ``out / tp`` features, or all of them with ``gather_output``.
    ``input_comm=False``: the caller already called ``mappings.enter_tensor_region`` (once for
    several layers reading the same input), so this layer does no input communication.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: Group,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        input_comm: bool = True,
        init_fn: InitFn = normal_init(0.02),
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp, self.gather_output, self.input_comm = tp, gather_output, input_comm
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.init_fn = init_fn
        local_out = _divide(out_features, tp.size, "output features of a column-parallel linear")
        self.weight = nn.Parameter(torch.empty(local_out, in_features, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("linear", (out_features, in_features), (Split(0, "tp"),)))
        self._setup_gemm(fp8, "out", tp)
        self.bias = nn.Parameter(torch.empty(local_out, device=device, dtype=dtype)) if bias else None
        if self.bias is not None:
            set_spec(self.bias, ParamSpec("bias", (out_features,), (Split(0, "tp"),)))

    def init_weights(self, generator: torch.Generator) -> None:
        init_sharded_(self.weight, (self.out_features, self.in_features), 0, self.tp, self.init_fn, generator)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_comm:
            x = mappings.enter_tensor_region(x, self.tp, self.sequence_parallel)
        y = self._gemm(x, self.bias)
        if self.gather_output:
            y = mappings.gather_from_region(y, self.tp, dim=-1)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp.size}, sp={self.sequence_parallel}" + self._fp8_repr()


class RowParallelLinear(_Gemm):
    """``y = x W^T (+ b)`` with ``W`` split along its input dimension over TP.

    Input: this rank's ``in / tp`` features (``input_is_parallel``) or the full replicated input.
    Output: the summed result, replicated ``[s, b, out]`` or, with sequence parallel,
    reduce-scattered to ``[s/tp, b, out]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: Group,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_fn: InitFn = normal_init(0.02),
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp, self.input_is_parallel = tp, input_is_parallel
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.init_fn = init_fn
        local_in = _divide(in_features, tp.size, "input features of a row-parallel linear")
        self.weight = nn.Parameter(torch.empty(out_features, local_in, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("linear", (out_features, in_features), (Split(1, "tp"),)))
        self._setup_gemm(fp8, "in", tp)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None:
            set_spec(self.bias, ParamSpec("bias", (out_features,), grad_partial_over_tp=self.sequence_parallel))

    def init_weights(self, generator: torch.Generator) -> None:
        init_sharded_(self.weight, (self.out_features, self.in_features), 1, self.tp, self.init_fn, generator)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_region(x, self.tp, dim=-1)
        y = mappings.exit_tensor_region(self._gemm(x), self.tp, self.sequence_parallel)
        # The bias is added once, after the sum, so it is not counted tp times.
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp.size}, sp={self.sequence_parallel}" + self._fp8_repr()


class ReplicatedLinear(_Gemm):
    """A linear layer whose full weight every TP rank holds (e.g. MLA down-projections, router).

    ``grad_partial_over_tp``: the layer sees only this rank's tokens (sequence parallel), so
    each rank's weight gradient is a partial sum that is all-reduced over TP before the step.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grad_partial_over_tp: bool = False,
        init_fn: InitFn = normal_init(0.02),
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init_fn = init_fn
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("linear", (out_features, in_features), grad_partial_over_tp=grad_partial_over_tp))
        self._setup_gemm(fp8, None, None)

    def init_weights(self, generator: torch.Generator) -> None:
        init_sharded_(self.weight, tuple(self.weight.shape), None, None, self.init_fn, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, replicated" + self._fp8_repr()


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary over TP.

    Each rank looks up the ids in its vocabulary range (others give zeros) and the partial
    embeddings are summed over TP: all-reduced, or reduce-scattered along the sequence
    (``[s, b] -> [s/tp, b, h]``) with sequence parallel.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp: Group,
        sequence_parallel: bool = False,
        init_fn: InitFn = normal_init(0.02),
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp, self.sequence_parallel = tp, sequence_parallel and tp.size > 1
        self.init_fn = init_fn
        local = _divide(num_embeddings, tp.size, "vocabulary size of a vocab-parallel embedding")
        self.vocab_start = tp.rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("embedding", (num_embeddings, embedding_dim), (Split(0, "tp"),)))

    def init_weights(self, generator: torch.Generator) -> None:
        init_sharded_(self.weight, (self.num_embeddings, self.embedding_dim), 0, self.tp, self.init_fn, generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.exit_tensor_region(out, self.tp, self.sequence_parallel)


def all_reduce_sequence_parallel_grads(module: nn.Module, tp: Group) -> None:
    """Sum over TP the gradients of replicated parameters that saw sequence-sharded inputs."""
    if tp.size == 1:
        return
    for param in module.parameters():
        if spec_of(param).grad_partial_over_tp and param.grad is not None:
            mappings.all_reduce_(param.grad, tp)
