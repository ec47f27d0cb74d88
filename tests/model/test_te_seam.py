"""megamoe's side of the Transformer Engine FP8 seam, on the CPU with a stand-in for TE (the
real TE runs in the GPU tier, tests/kernels/test_fp8.py): which TE recipe each megamoe recipe
becomes, that a TE-backed linear keeps its one megamoe parameter, and that TE is told to
quantize a weight again exactly when the weight changed."""

from __future__ import annotations

import contextlib
import enum
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.parallel.state import ParallelState


class _Recipe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _StandInLinear(nn.Module):
    """te.Linear's interface: its own weight, ``forward(x, is_first_microbatch)``."""

    def __init__(self, in_features, out_features, bias, params_dtype, device):
        super().__init__()
        assert not bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.calls: list = []

    def forward(self, x, is_first_microbatch=None):
        self.calls.append(is_first_microbatch)
        return F.linear(x, self.weight)


@pytest.fixture
def stand_in_te(monkeypatch):
    regions = []
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Format = enum.Enum("Format", "E4M3 HYBRID")
    for name in ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling"):
        setattr(recipe_mod, name, type(name, (_Recipe,), {}))
    pytorch_mod = types.ModuleType("transformer_engine.pytorch")
    pytorch_mod.Linear = _StandInLinear

    def autocast(**kwargs):
        regions.append(kwargs)
        return contextlib.nullcontext()

    pytorch_mod.autocast = autocast
    root, common = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.common")
    root.pytorch, root.common, common.recipe = pytorch_mod, common, recipe_mod
    for name, mod in (("transformer_engine", root), ("transformer_engine.pytorch", pytorch_mod),
                      ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    return recipe_mod, regions


def test_each_recipe_becomes_tes(stand_in_te):
    from megamoe.extensions.te import te_recipe

    recipes, _ = stand_in_te
    delayed = te_recipe(Fp8Recipe("hybrid", "delayed", True, amax_history_len=16, amax_compute_algo="max"))
    assert type(delayed).__name__ == "DelayedScaling"
    assert delayed.kwargs == dict(fp8_format=recipes.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    assert type(te_recipe(Fp8Recipe("e4m3", "tensorwise", True))).__name__ == "Float8CurrentScaling"
    blockwise = te_recipe(Fp8Recipe("e4m3", "blockwise", True))
    assert type(blockwise).__name__ == "Float8BlockScaling" and blockwise.kwargs == dict(fp8_format=recipes.Format.E4M3)
    with pytest.raises(ValueError, match="no 'rowwise' FP8 recipe"):
        te_recipe(Fp8Recipe("e4m3", "rowwise", True))


def test_a_te_linear_borrows_its_weight_and_requantizes_only_after_a_change(stand_in_te):
    from megamoe.parallel.tensor_parallel import ColumnParallelLinear

    _, regions = stand_in_te
    layer = ColumnParallelLinear(32, 48, ParallelState.single().tp, fp8=Fp8Recipe("hybrid", "blockwise", True))
    layer.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(4, 2, 32)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight))
    te_linear = layer._te_gemm.linear
    assert te_linear.weight is layer.weight  # borrowed, not copied
    assert [n for n, _ in layer.named_parameters()] == ["weight"] and list(layer.state_dict()) == ["weight"]
    assert len(regions) == 1 and type(regions[0]["recipe"]).__name__ == "Float8BlockScaling"
    layer(x)  # the next micro-batch: TE reuses its FP8 weight
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step
    layer(x)
    with torch.no_grad():
        layer(x)  # evaluation: no caching either way
    assert te_linear.calls == [True, False, True, None]
    layer.weight = nn.Parameter(layer.weight.detach().clone())  # as a meta-device build's to_empty does
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert te_linear.weight is layer.weight and te_linear.calls[-1] is True


@pytest.mark.parametrize("tp_only", [False, True])
def test_delayed_scaling_reduces_amaxes_over_the_stage_unless_tp_only(stand_in_te, tp_only):
    """Under TE's delayed recipe every TE region of the model reduces its amaxes over the
    pipeline stage's TP x DP x CP ranks (Megatron's default), or with --tp-only-amax-red over
    the layer's own TP group; a current-scaling recipe always over the layer's own group."""
    from megamoe.cli import parse_config
    from megamoe.model.args import gpt_args
    from megamoe.model.gpt import GPTModel
    from megamoe.precision import PrecisionPolicy

    argv = ["--config", "examples/configs/demo.yaml", "--num-experts", "0", "--bf16", "--fp8-format", "hybrid",
            "--transformer-impl", "transformer_engine"] + (["--tp-only-amax-red"] if tp_only else [])
    own = {"tp", None}  # column/row-parallel layers: their TP group; replicated ones (MLA's down-projections): none
    for recipe, expected in (("delayed", own if tp_only else {"tp_dp_cp"}), ("blockwise", own)):
        if tp_only and recipe != "delayed":
            continue
        cfg = parse_config(argv + ["--fp8-recipe", recipe])
        args = gpt_args(cfg)
        policy = PrecisionPolicy.from_config(cfg)
        model = GPTModel(args, ParallelState.single(), fp8_layers=policy.fp8_layers(args.num_layers, args.num_blocks))
        regions = [m._te_gemm.fp8 for m in model.modules() if getattr(m, "_te_gemm", None) is not None]
        assert regions and {r.amax_group.name if r.amax_group else None for r in regions} == expected, recipe
