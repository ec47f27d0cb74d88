"""Routed experts: this rank's expert MLPs (SwiGLU, or GeLU without ``gated``) behind one
interface, several GEMM backends.

Shape legend: N dispatched token rows (sorted by local expert), D hidden, F this rank's slice
of the expert FFN (``ffn / etp``), E local experts.

Weights are stacked per local expert: ``w13`` [E, 2F, D], each expert's gate (``w1``, DeepSeek's
name) and up (``w3``) projections stacked so one grouped GEMM computes both, and ``w2`` [E, D, F].
GeLU experts (not ``gated``) have ``w1`` [E, F, D] instead of ``w13``. Expert-TP shards F: every
expert-TP rank holds its own slice of the gate and of the up projection, ``[w1 shard; w3 shard]``,
so the two halves of ``w13`` are cut separately (its spec's split has ``parts = 2``); TE's ``fc1``
weights use the same layout, and their specs place each one in the same global ``w13`` and
``w2``, so checkpoints do not depend on the backend. Expert parameters have the role
``expert``: their gradients are reduced over expert-DP, not DP.

Backends:

- ``loop``: one matmul per expert (reference; needs the counts on the host);
- ``torch``: ``torch._grouped_mm`` with device-side offsets (no host sync). It needs CUDA with
  compute capability 9.0+, bfloat16 and dimensions that are multiples of 8; elsewhere (CPU,
  older GPUs, fp32, this torch's CPU kernel whose backward is missing) it falls back to
  ``loop`` and says so once;
- ``te``: Transformer Engine ``GroupedLinear`` (see ``megamoe/extensions/te.py``).

With an FP8 recipe (``fp8``, from the precision policy) the ``loop`` and ``torch`` backends run
both GEMMs through ``megamoe/kernels/fp8_gemm.py``: ``torch._scaled_grouped_mm`` on CUDA, the
SwiGLU fused into the quantization of the second GEMM's input. Expert-TP cuts the first GEMM's
output and the second's input, so those operands' amaxes are reduced over expert-TP. The
``te`` backend runs TE's FP8 recipes in its ``GroupedLinear`` layers (rows per expert padded to
16 by the dispatcher).
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.kernels.fp8_gemm import Fp8WeightCache, GradHandoff, fp8_grouped_linear, mark_fp8_weight
from megamoe.parallel.param_spec import ParamSpec, Split, set_spec
from megamoe.parallel.state import Group
from megamoe.parallel.weight_grad import WeightGradStore, grouped_linear
from megamoe.parallel.tensor_parallel import InitFn, amax_reducer, fp8_for_shape, normal_init

ExpertBackend = Literal["loop", "torch", "te"]
log = logging.getLogger(__name__)
_warned: set[str] = set()


def grouped_mm_unsupported_reason(x: torch.Tensor, *weights: torch.Tensor) -> Optional[str]:
    """Why ``torch._grouped_mm`` cannot run these operands (None when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if not x.is_cuda:
        return "torch._grouped_mm's CPU kernel has no backward in this torch"
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return "torch._grouped_mm needs compute capability 9.0+"
    if x.dtype != torch.bfloat16:
        return f"torch._grouped_mm is used for bfloat16 only (got {x.dtype})"
    if any(d % 8 for w in weights for d in w.shape[1:]) or x.shape[-1] % 8:
        return "torch._grouped_mm needs dimensions that are multiples of 8"
    return None


def activate_fc1(h_NF: torch.Tensor, gated: bool) -> torch.Tensor:
    """The activation of the first GEMM's output: SwiGLU of its [gate | up] halves, or GeLU."""
    if not gated:
        return F.gelu(h_NF)
    h1, h3 = h_NF.chunk(2, dim=-1)
    return F.silu(h1) * h3


def _mlp_loop(x_ND, fc1_EFD, w2_EDF, gated: bool, counts: list[int]) -> torch.Tensor:
    outs = [activate_fc1(x_e @ fc1_EFD[e].t(), gated) @ w2_EDF[e].t() for e, x_e in enumerate(x_ND.split(counts))]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w2_EDF.shape[1])


def _mlp_grouped_mm(x_ND, fc1_EFD, w2_EDF, gated: bool, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    h = torch._grouped_mm(x_ND, fc1_EFD.transpose(-2, -1), offs=offsets)  # gate and up in one GEMM
    return torch._grouped_mm(activate_fc1(h, gated), w2_EDF.transpose(-2, -1), offs=offsets)


class GroupedExperts(nn.Module):
    """This rank's ``num_local_experts`` experts (global ids from ``first_expert``)."""

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        first_expert: int,
        hidden_size: int,
        ffn_hidden_size: int,
        etp: Group,
        backend: ExpertBackend = "torch",
        init_fn: InitFn = normal_init(0.02),
        output_init_fn: InitFn = normal_init(0.02),
        gated: bool = True,
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if ffn_hidden_size % etp.size:
            raise ValueError(f"expert FFN size {ffn_hidden_size} is not divisible by the expert-TP size {etp.size}")
        self.num_experts, self.num_local_experts, self.first_expert = num_experts, num_local_experts, first_expert
        self.hidden_size, self.ffn_hidden_size, self.etp = hidden_size, ffn_hidden_size, etp
        self.backend, self.gated = backend, gated
        self.init_fn, self.output_init_fn = init_fn, output_init_fn
        f_local = ffn_hidden_size // etp.size
        kw = dict(device=device, dtype=dtype)
        # both GEMMs in FP8, or neither (w2's local shape is the first GEMM's, transposed); the
        # te backend runs TE's recipes (delayed, tensorwise, blockwise), the others megamoe's
        self.fp8 = fp8_for_shape(fp8, f_local, hidden_size)
        self._fp8_caches = (Fp8WeightCache(), Fp8WeightCache())
        self._fp8_reduce = amax_reducer(etp)
        self.te = None
        self.wgrad_store: Optional[WeightGradStore] = None  # set by GPTModel.defer_weight_grads
        self.fc1_name = "w13" if gated else "w1"
        # The global tensors every backend's parameters are cut from (param_spec.py).
        parts = 2 if gated else 1
        fc1_spec = ParamSpec("expert", (num_experts, parts * ffn_hidden_size, hidden_size),
                             (Split(0, "ep"), Split(1, "etp", parts=parts)))
        w2_spec = ParamSpec("expert", (num_experts, hidden_size, ffn_hidden_size), (Split(0, "ep"), Split(2, "etp")))
        if backend == "te":
            from megamoe.extensions.te import TEGroupedMLP

            self.te = TEGroupedMLP(num_local_experts, hidden_size, f_local, gated, self.fp8, etp, **kw)
            for i in range(num_local_experts):  # one expert each: its slice of the global tensors
                index = (first_expert + i,)
                set_spec(self.te.fc1_weight(i), fc1_spec.with_(splits=fc1_spec.splits[1:], index=index,
                                                               rename=(f"te.fc1.weight{i}", self.fc1_name)))
                set_spec(self.te.fc2_weight(i), w2_spec.with_(splits=w2_spec.splits[1:], index=index,
                                                              rename=(f"te.fc2.weight{i}", "w2")))
            return
        fc1 = nn.Parameter(torch.empty(num_local_experts, parts * f_local, hidden_size, **kw))
        self.register_parameter(self.fc1_name, set_spec(fc1, fc1_spec))
        self.w2 = set_spec(nn.Parameter(torch.empty(num_local_experts, hidden_size, f_local, **kw)), w2_spec)
        if self.fp8 is not None:
            mark_fp8_weight(self.fc1, self.fp8, "out")  # cut as _forward_fp8 runs them
            mark_fp8_weight(self.w2, self.fp8, "in")

    def init_weights(self, generator: torch.Generator) -> None:
        """Each expert's full weights come from its own seed, so they do not depend on which
        rank holds the expert (EP) or how its FFN is split (expert-TP)."""
        base = generator.initial_seed()
        F_, D = self.ffn_hidden_size, self.hidden_size
        device = next(self.parameters()).device
        for i in range(self.num_local_experts):
            e = self.first_expert + i
            g = torch.Generator(device=device).manual_seed((base * 1_000_003 + e) % (2**63))
            w1, w2 = torch.empty(F_, D, device=device), torch.empty(D, F_, device=device)
            w3 = torch.empty(F_, D, device=device) if self.gated else None
            self.init_fn(w1, g)
            if w3 is not None:
                self.init_fn(w3, g)
            self.output_init_fn(w2, g)
            shard = (w1.chunk(self.etp.size, 0)[self.etp.rank],
                     None if w3 is None else w3.chunk(self.etp.size, 0)[self.etp.rank],
                     w2.chunk(self.etp.size, 1)[self.etp.rank])
            if self.te is not None:
                self.te.load_expert(i, *shard)
                continue
            with torch.no_grad():
                self.fc1[i].copy_(shard[0] if shard[1] is None else torch.cat([shard[0], shard[1]]))
                self.w2[i].copy_(shard[2])

    @property
    def fc1(self) -> nn.Parameter:
        """The first GEMM's weight: ``w13`` (gated) or ``w1``."""
        return getattr(self, self.fc1_name)

    def stacked(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """This rank's expert weights (or main gradients) as ``w1`` [E, F, D], ``w3`` (gated),
        ``w2`` [E, D, F], whatever the backend stores."""
        if self.te is not None:
            return self.te.stacked(grads)
        pick = (lambda p: p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else (lambda p: p.detach())
        fc1, w2 = pick(self.fc1), pick(self.w2)
        if not self.gated:
            return {"w1": fc1, "w2": w2}
        w1, w3 = fc1.chunk(2, dim=1)
        return {"w1": w1, "w3": w3, "w2": w2}

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor,
                fp8_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The MLP of each row's expert; rows are grouped by expert in local order.
        ``fp8_rows``: the rows already quantized (FP8 dispatch), the first GEMM's input; ``x_ND``
        is then only the stand-in that carries their gradient.

        Returns this rank's partial sum over the expert-TP shards of F.
        """
        if fp8_rows is not None and (self.te is not None or self.fp8 is None):
            raise ValueError("FP8-dispatched rows need the native FP8 experts (the config validation refuses "
                             "--moe-fp8-dispatch without them)")
        if self.te is not None:
            return self.te(x_ND, tokens_per_expert)
        if self.fp8 is not None:
            return self._forward_fp8(x_ND, tokens_per_expert, fp8_rows)
        grouped_mm = False
        if self.backend == "torch":
            reason = grouped_mm_unsupported_reason(x_ND, self.fc1, self.w2)
            grouped_mm = reason is None
            if reason is not None and reason not in _warned:
                _warned.add(reason)
                log.warning("expert backend 'torch' runs the loop instead: %s", reason)
        if self.wgrad_store is not None:  # weight gradients a zero-bubble schedule may defer
            h = grouped_linear(x_ND, self.fc1, tokens_per_expert, self.wgrad_store, grouped_mm)
            return grouped_linear(activate_fc1(h, self.gated), self.w2, tokens_per_expert, self.wgrad_store,
                                  grouped_mm)
        if grouped_mm:
            return _mlp_grouped_mm(x_ND, self.fc1, self.w2, self.gated, tokens_per_expert)
        counts = tokens_per_expert.tolist()  # host sync: the loop needs the split sizes
        return _mlp_loop(x_ND, self.fc1, self.w2, self.gated, counts)

    def _forward_fp8(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, fp8_rows) -> torch.Tensor:
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        recipe, (cache1, cache2), reduce = self.fp8, self._fp8_caches, self._fp8_reduce
        # the down projection's backward quantizes dh for the gate/up projection's backward when
        # that is the quantization the latter would make (rowwise, no amax reduction over expert-TP)
        handoff = GradHandoff() if self.gated and recipe.granularity == "rowwise" and reduce is None else None
        h = fp8_grouped_linear(x_ND, self.fc1, offsets, recipe, cache1, "out", reduce, quantized_input=fp8_rows,
                               handoff=handoff)
        if not self.gated:
            return fp8_grouped_linear(F.gelu(h), self.w2, offsets, recipe, cache2, "in", reduce)
        return fp8_grouped_linear(h, self.w2, offsets, recipe, cache2, "in", reduce, swiglu_input=True,
                                  handoff=handoff)

    def extra_repr(self) -> str:
        fp8 = "" if self.fp8 is None else f", fp8={self.fp8.fmt}/{self.fp8.granularity}"
        return (f"experts={self.num_local_experts}/{self.num_experts} from {self.first_expert}, "
                f"D={self.hidden_size}, F={self.ffn_hidden_size}/{self.etp.size}, backend={self.backend}, "
                f"{'swiglu' if self.gated else 'gelu'}{fp8}")
