"""``--fp8-param-gather``: the distributed optimizer's FP8 all-gather of the FP8 weights.

After every step, each FP8 weight (the global tensor, assembled from every rank) must be the
FP8 quantization of its float32 masters (assembled likewise), computed here from the
definition: per row (rowwise) or per matrix (tensorwise) of the global tensor, the power of
two that brings the amax to at most 448, e4m3 rounding, saturation. Data-parallel shards cut
rows and matrices (small buckets), and tensor parallelism cuts them over TP and expert-TP, so
the amax reductions show here. The losses and every weight must also equal the single-process
run's with the same flag, whose gather is a copy, within float64 summation order (1e-9). Without the
flag, FP8 under the distributed optimizer must train as under the whole-tensor optimizer (the
FP8 layers must see each step's weights); and a load must leave the weights the FP8 values of
the loaded masters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.kernels.fp8_gemm import fp8_weight_recipe
from megamoe.parallel import mappings
from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, every_rank_micro_batches, gather_full, make_config
from megamoe.training.train import MicroBatches, build_optimizer, train_step

DT = torch.float64


def _fp8_values(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``w`` quantized to e4m3 and dequantized, per row or per matrix of its last two dims."""
    units = w.reshape(-1, w.shape[-1] if granularity == "rowwise" else w.shape[-2] * w.shape[-1])
    amax = units.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(448.0 / amax))), torch.ones_like(amax))
    q = (units * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.to(DT) / scale).view_as(w)


def _global_masters(opt, state: ParallelState) -> dict:
    """Every parameter's masters as its global tensor: each element's master lives on one rank
    of its bucket's group, so the zero-filled local tensors sum to the whole."""
    local = {p: torch.zeros(p.numel(), dtype=DT, device=p.device) for p in opt.params}
    for param, lo, master in opt.master_pieces():
        local[param][lo:lo + master.numel()] = master.reshape(-1)
    for bucket in opt.grads.buckets:
        for p in bucket.params:
            mappings.all_reduce_(local[p], bucket.group)
    return {p: gather_full(local[p].view_as(p), p, state) for p in opt.params}


def _fp8_config(layout: dict, recipe: str):
    cfg = make_config("mla", {**layout, "distopt": True})
    cfg.model.fp8_format, cfg.model.fp8_recipe, cfg.model.fp8_param_gather = "hybrid", recipe, True
    cfg.moe.moe_router_dtype = "fp64"
    return cfg


def _fp8_gather_parity(layout: dict, recipe: str):
    cfg = _fp8_config(layout, recipe)
    state, single = ParallelState.build(**cfg.parallel.degrees()), ParallelState.single()
    ref_cfg = _fp8_config({"gbs": cfg.training.global_batch_size}, recipe)
    ref_cfg.training = copy.deepcopy(cfg.training)
    model, ref = build(cfg, state), build(ref_cfg, single)
    opt, ref_opt = build_optimizer(model, cfg, state), build_optimizer(ref, ref_cfg, single)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    fp8_weights = [p for p in model.parameters() if fp8_weight_recipe(p) is not None]
    assert fp8_weights and {b.buffer.name for b in opt.fp8_gathers} >= {"dense_fp8", "expert_fp8"}
    gathered_bytes = []
    for step in range(1, cfg.training.train_iters + 1):
        got = train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro)], step, cfg, state, None)
        want = train_step(ref, ref_opt, every_rank_micro_batches(data, state, step), step, ref_cfg, single, None)
        assert abs(got.lm_loss - want.lm_loss) <= 1e-9 * abs(want.lm_loss), (step, got.lm_loss, want.lm_loss)
        opt.finish_param_sync()
        masters = _global_masters(opt, state)
        for p in fp8_weights:
            full = gather_full(p.detach(), p, state)
            expected = _fp8_values(masters[p], recipe)
            assert torch.equal(full, expected), (step, p.shape, (full - expected).abs().max().item())
            assert not torch.equal(masters[p], expected)  # the masters keep what FP8 rounds away
    for bucket, gather in opt.fp8_gathers.items():  # one byte per element on the wire
        gathered_bytes.append(gather.quantize_shard(opt.pieces[bucket]).element_size())
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(gather_full(p.detach(), p, state), gather_full(ref_params[name].detach(),
                                                                                    ref_params[name], single),
                                   **TOL, msg=f"weight {name}")
    return set(gathered_bytes)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_weights_follow_the_distributed_optimizers_updates(recipe):
    """FP8 without the flag: the distributed optimizer writes the weights through its buffers,
    and the FP8 layers must quantize the new weights each step (their caches key on the
    weights' versions), as with the whole-tensor optimizer. Three steps, one process, float64:
    the same losses and weights to summation order."""
    single = ParallelState.single()
    runs = []
    for distopt in (False, True):
        cfg = _fp8_config({"gbs": 2}, recipe)
        cfg.model.fp8_param_gather, cfg.parallel.use_distributed_optimizer = False, distopt
        model = build(cfg, single)
        opt = build_optimizer(model, cfg, single)
        data = MicroBatches(cfg, single, torch.device("cpu"))
        losses = [train_step(model, opt, [data.get(s - 1, j) for j in range(data.num_micro)], s, cfg, single,
                             None).lm_loss for s in range(1, 4)]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (want, ref), (got, weights) = runs
    assert got == pytest.approx(want, rel=1e-9)
    for name, w in weights.items():
        torch.testing.assert_close(w, ref[name], **TOL, msg=name)


@pytest.mark.parametrize("world, layout, recipe", [
    # small buckets cut rows across the two shards; the gathers overlap the next forward
    (2, {"gbs": 4, "bucket": 3000, "gather": True}, "rowwise"),
    # TP 2 cuts the dense matrices, expert-TP 2 (= TP) the experts' (tensorwise: whole matrices)
    (4, {"gbs": 4, "tp": 2, "bucket": 3000}, "tensorwise"),
], ids=["dp2,rowwise,overlap", "dp2,tp2,tensorwise"])
def test_fp8_param_gather_quantizes_the_masters_in_every_layout(workers, world, layout, recipe):
    for element_sizes in workers(world).run(_fp8_gather_parity, layout, recipe):
        assert element_sizes == {1}


def test_fp8_param_gather_flags():
    def check(*flags):
        validate(parse_config(["--config", "examples/configs/demo.yaml", "--bf16", "--fp8-format", "hybrid",
                               "--fp8-recipe", "rowwise", *flags]), 1)

    check("--fp8-param-gather", "--use-distributed-optimizer")
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --use-distributed-optimizer"):
        check("--fp8-param-gather")
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --transformer-impl local"):
        check("--fp8-param-gather", "--use-distributed-optimizer", "--transformer-impl", "transformer_engine")
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --fp8-format"):
        validate(parse_config(["--config", "examples/configs/demo.yaml", "--fp8-param-gather",
                               "--use-distributed-optimizer"]), 1)


def test_a_load_makes_the_weights_the_fp8_values_of_the_loaded_masters(tmp_path):
    """A checkpoint saved without the flag (bf16-gathered weights) loaded with it: the weights
    are the FP8 values of the loaded masters before the first step, as a step leaves them."""
    from megamoe.training.checkpoint import load_checkpoint, save_checkpoint

    single, cpu = ParallelState.single(), torch.device("cpu")
    plain = _fp8_config({"gbs": 2}, "rowwise")
    plain.model.fp8_param_gather = False
    model = build(plain, single)
    opt = build_optimizer(model, plain, single)
    data = MicroBatches(plain, single, cpu)
    train_step(model, opt, [data.get(0, j) for j in range(data.num_micro)], 1, plain, single, None)
    save_checkpoint(str(tmp_path), 1, model, opt, single, plain, 2, None, cpu)

    cfg = _fp8_config({"gbs": 2}, "rowwise")
    loaded = build(cfg, single)
    loaded_opt = build_optimizer(loaded, cfg, single)
    load_checkpoint(str(tmp_path), loaded, loaded_opt, single, cfg, None, cpu)
    masters = _global_masters(loaded_opt, single)
    saved = dict(model.named_parameters())
    checked = 0
    for name, p in loaded.named_parameters():
        if fp8_weight_recipe(p) is None:
            torch.testing.assert_close(p, saved[name], rtol=0, atol=0)
            continue
        torch.testing.assert_close(masters[p], saved[name].detach(), rtol=0, atol=0)  # float64: its own master
        assert torch.equal(p.detach(), _fp8_values(masters[p], "rowwise")), name
        checked += 1
    assert checked


@pytest.mark.gpu
def test_fp8_param_gather_on_the_gpu_in_bf16():
    """The CUDA path in bf16 with float32 masters: after two steps every FP8 weight holds the
    FP8 values of its masters (exact in bf16), and the loss stays that of bf16 weights."""
    from megamoe.training.train import build_model

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with compute capability 9.0+")
    cuda, single = torch.device("cuda"), ParallelState.single()
    cfg = _fp8_config({"gbs": 2}, "rowwise")
    cfg.training.bf16, cfg.moe.moe_router_dtype = True, "fp32"
    model = build_model(cfg, single, "cuda", dtype=torch.bfloat16)
    opt = build_optimizer(model, cfg, single)
    data = MicroBatches(cfg, single, cuda)
    for step in (1, 2):
        loss = train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro)], step, cfg, single,
                          None).lm_loss
        assert 0 < loss < 20
    masters = _global_masters(opt, single)
    fp8 = [p for p in model.parameters() if fp8_weight_recipe(p) is not None]
    assert fp8 and all(p.dtype == torch.bfloat16 for p in fp8)
    for p in fp8:
        assert torch.equal(p.detach().to(DT), _fp8_values(masters[p].to(cuda), "rowwise")), p.shape
