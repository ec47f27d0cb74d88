"""Transformer Engine backends. The only module that imports ``transformer_engine``.

``TEGroupedMLP`` runs this rank's experts with two TE ``GroupedLinear`` layers: ``fc1``
holds each expert's ``[w1; w3]`` slice fused ``[2F, D]`` (one grouped GEMM for both; ``w1``
alone, ``[F, D]``, for GeLU experts), ``fc2`` its ``w2`` slice ``[D, F]``. Weights are drawn
exactly as the other backends draw them, so all backends start from the same model, and their
specs (set by ``GroupedExperts``) place them in the same global tensors.

FP8 (``Fp8Recipe`` with ``delayed``, ``tensorwise`` or ``blockwise``): each TE call runs in its
own ``te.autocast`` region with TE's recipe object, so the FP8 layers are exactly the ones the
precision policy chose. ``TELinearGemm`` is the dense linears' TE GEMM: a ``te.Linear`` that
borrows the megamoe layer's weight (TE does no communication: the megamoe layer around it
does, the same for every backend). Weights are quantized once per weight version
(``is_first_microbatch``: TE caches the FP8 weight until the optimizer changes it).

Scaling state. Under ``delayed`` the amax histories live in the TE modules; the amaxes are
reduced over every TP x DP x CP rank of the pipeline stage (the recipe's ``te_amax_group``, set
by ``GPTModel``: Megatron's default), so all replicas keep one scale history, or with
``--tp-only-amax-red`` over each layer's own group (the layer's TP group, the experts'
expert-TP group), so at least the ranks sharing a cut tensor use one scale. Each region's
reduction is a collective over that group when the region ends, and every rank of the stage
runs the same regions in the same order (the experts' too, with or without tokens). The
histories are not checkpointed: a resumed run rebuilds them from the first steps' amaxes
(``--fp8-amax-history-len`` steps), as a fresh run does. The current-scaling recipes keep no
state and reduce over the layer's own group, for the tensors it cuts.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.eager import eager_under_compile
from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.parallel.state import Group


def loaded_library_dir(soname_prefix: str) -> Optional[str]:
    """The directory of the first library mapped into this process whose file name starts
    with ``soname_prefix`` (Linux: from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith(soname_prefix):
                    return os.path.dirname(path)
    except OSError:
        pass
    return None


def _load_torch_cudnn_first() -> None:
    """Make TE use the cuDNN torch was built with.

    TE's import loads the first cuDNN it finds (``CUDNN_HOME``, ``CUDNN_PATH``, ``CUDA_HOME``,
    /usr/local/cuda, then the loader's path). Where that is another version than torch's (on the
    H200 machine: the system's 9.14 against torch's bundled 9.19), torch's SDPA then finds a
    runtime version it was not built against, drops its cuDNN attention and falls back to the
    memory-efficient kernel (8x slower backward at MLA's 192-wide heads). So, before TE's
    import: every library of torch's cuDNN is loaded (cuDNN 9's front library opens its engine
    and heuristic libraries by name later, and a name already loaded is not searched again),
    and TE's search is pointed at them, unless the user chose a cuDNN with CUDNN_HOME/PATH."""
    if "transformer_engine" in sys.modules or not torch.cuda.is_available():
        return
    if os.environ.get("CUDNN_HOME") or os.environ.get("CUDNN_PATH"):
        return
    torch.backends.cudnn.version()  # loads torch's cuDNN if it is not loaded yet
    torch_cudnn = loaded_library_dir("libcudnn.so")
    if torch_cudnn is None:
        return
    for path in sorted(glob.glob(os.path.join(torch_cudnn, "libcudnn*.so*"))):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # a sub-library whose own dependencies are missing: cuDNN does without it
    os.environ["CUDNN_PATH"] = torch_cudnn


def import_te():
    """``transformer_engine.pytorch``, or an ImportError that says how to get it."""
    _load_torch_cudnn_first()
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        raise ImportError(
            "the 'te' expert backend needs Transformer Engine: pip install 'megamoe[te]' "
            "(or use --moe-grouped-gemm-impl torch)"
        ) from err
    return te


def te_recipe(recipe: Fp8Recipe):
    """TE's recipe object for a megamoe FP8 recipe."""
    from transformer_engine.common import recipe as te_recipes

    fmt = te_recipes.Format.HYBRID if recipe.fmt == "hybrid" else te_recipes.Format.E4M3
    if recipe.granularity == "delayed":
        return te_recipes.DelayedScaling(fp8_format=fmt, amax_history_len=recipe.amax_history_len,
                                         amax_compute_algo=recipe.amax_compute_algo)
    if recipe.granularity == "tensorwise":
        return te_recipes.Float8CurrentScaling(fp8_format=fmt)
    if recipe.granularity == "blockwise":
        return te_recipes.Float8BlockScaling(fp8_format=fmt)
    raise ValueError(f"Transformer Engine has no '{recipe.granularity}' FP8 recipe (it runs delayed, tensorwise, "
                     "blockwise)")


class Fp8Region:
    """One TE module call's FP8 settings: ``region()`` is its ``te.autocast`` (a no-op without
    a recipe), ``first_use(weight)`` whether the weight changed since the last call (TE then
    quantizes it again; otherwise it reuses its FP8 copy). ``amax_group``: the layer's own
    group, used unless the recipe names a wider one (``te_amax_group``, delayed scaling)."""

    def __init__(self, recipe: Optional[Fp8Recipe], amax_group: Optional[Group]):
        self.recipe = te_recipe(recipe) if recipe is not None else None
        if recipe is not None and recipe.te_amax_group is not None:
            amax_group = recipe.te_amax_group
        self.amax_group = amax_group
        group = amax_group.process_group if amax_group is not None and amax_group.size > 1 else None
        self._autocast = None  # resolved once: region() runs on every TE call
        if self.recipe is not None:
            te = import_te()
            if hasattr(te, "autocast"):  # TE 2.x; fp8_autocast is its older name
                self._autocast = lambda: te.autocast(enabled=True, recipe=self.recipe, amax_reduction_group=group)
            else:
                self._autocast = lambda: te.fp8_autocast(enabled=True, fp8_recipe=self.recipe, fp8_group=group)
        self._weight_key = None

    def region(self):
        return contextlib.nullcontext() if self._autocast is None else self._autocast()

    def first_use(self, weight: torch.Tensor) -> Optional[bool]:
        if self.recipe is None or not torch.is_grad_enabled():
            return None  # no caching: TE quantizes (or not) per call
        key = (weight.data_ptr(), weight._version)
        first, self._weight_key = key != self._weight_key, key
        return first


class TELinearGemm:
    """``x W^T`` through ``te.Linear`` in FP8, for a megamoe linear that keeps its own weight
    (spec, init, gradient hooks, checkpoint entry). Not an ``nn.Module``: the layer that holds
    it lists no TE parameter or state. The TE module is made at the first call, on the weight's
    device (the weight may still be on the meta device while the model is built)."""

    def __init__(self, recipe: Fp8Recipe, amax_group: Optional[Group]):
        self.fp8 = Fp8Region(recipe, amax_group)
        self.linear = None

    @eager_under_compile  # TE's modules are not traceable (dynamo fails on their guards): run eagerly
    def __call__(self, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        if self.linear is None:
            te = import_te()
            out_features, in_features = weight.shape
            self.linear = te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype,
                                    device=weight.device)
        if self.linear.weight is not weight:
            self.linear.weight = weight  # borrowed (again, if the layer's parameter was replaced)
        with self.fp8.region():
            return self.linear(x, is_first_microbatch=self.fp8.first_use(weight))


class TEGroupedMLP(nn.Module):
    """SwiGLU (``gated``) or GeLU experts on TE GroupedLinear; parameters ``fc1.weight{i}``,
    ``fc2.weight{i}``."""

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_local: int, gated: bool = True,
                 fp8: Optional[Fp8Recipe] = None, amax_group: Optional[Group] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        te = import_te()
        self.fp8 = Fp8Region(fp8, amax_group)
        kw = dict(bias=False, params_dtype=dtype or torch.get_default_dtype(),
                  device=device if device is not None else "cuda")
        self.num_local_experts, self.ffn_local, self.gated = num_local_experts, ffn_local, gated
        self.fc1 = te.GroupedLinear(num_local_experts, hidden_size, (2 if gated else 1) * ffn_local, **kw)
        self.fc2 = te.GroupedLinear(num_local_experts, ffn_local, hidden_size, **kw)
        # GroupedExperts gives each weight its spec: its expert's slice of the global w13 / w2

    def fc1_weight(self, i: int) -> nn.Parameter:
        return getattr(self.fc1, f"weight{i}")

    def fc2_weight(self, i: int) -> nn.Parameter:
        return getattr(self.fc2, f"weight{i}")

    @torch.no_grad()
    def load_expert(self, i: int, w1_FD: torch.Tensor, w3_FD: Optional[torch.Tensor], w2_DF: torch.Tensor) -> None:
        self.fc1_weight(i).copy_(w1_FD if w3_FD is None else torch.cat([w1_FD, w3_FD]))
        self.fc2_weight(i).copy_(w2_DF)

    def stacked(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """This rank's weights (or their main gradients) in the loop backend's stacked layout."""
        pick = (lambda p: p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else (lambda p: p.detach())
        fc1 = torch.stack([pick(self.fc1_weight(i)) for i in range(self.num_local_experts)])
        fc2 = torch.stack([pick(self.fc2_weight(i)) for i in range(self.num_local_experts)])
        if not self.gated:
            return {"w1": fc1, "w2": fc2}
        return {"w1": fc1[:, : self.ffn_local], "w3": fc1[:, self.ffn_local:], "w2": fc2}

    @eager_under_compile  # as TELinearGemm.__call__
    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Under FP8 every expert's row count must be a multiple of 16: the dispatcher pads them
        (``--moe-router-padding-for-fp8`` is on for this backend under FP8)."""
        m_splits = tokens_per_expert.tolist()  # host sync: GroupedLinear takes host split sizes
        first = self.fp8.first_use(self.fc1_weight(0))
        with self.fp8.region():
            h = self.fc1(x_ND, m_splits, is_first_microbatch=first)
        if self.gated:  # [gate | up] halves, as megamoe.model.experts.activate_fc1
            h1, h3 = h.chunk(2, dim=-1)
            h = F.silu(h1) * h3
        else:
            h = F.gelu(h)
        with self.fp8.region():
            return self.fc2(h, m_splits, is_first_microbatch=first)
