"""The native FP8 path on the CPU: the quantization against its definition, the FP8 GEMMs and
their backward against float64 products of the dequantized operands (an independent
reference), the error against unquantized float64 within the bound derived below, the weight
cache, the precision policy's per-layer choice, and tensor / expert parallelism (gloo) giving
the single-process FP8 model's losses and gradients.

Error bound. Rounding to e4m3 (3 mantissa bits) moves a value by at most 2^-4 of it (relative),
uniformly distributed, so its RMS relative error is about 2^-4 / sqrt(3) * E[1/m^2]^(1/2) with m
the mantissa in [1, 2): 0.026. e5m2 (2 bits): 0.052. A GEMM of two independently rounded
operands with random signs has a relative (Frobenius) error near sqrt(e_a^2 + e_b^2): 0.037 for
e4m3 x e4m3, 0.058 for e5m2 x e4m3. The tests allow 0.05 and 0.075.
"""

from __future__ import annotations

import pytest
import torch

from megamoe.kernels.fp8 import E4M3, E5M2, FP8_MAX, Fp8Recipe, dequantize, quantize, quantize_transposed, swiglu
from megamoe.kernels.fp8_gemm import Fp8WeightCache, fp8_grouped_linear, fp8_linear
from megamoe.parallel import mappings
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import gather_full, make_config
from megamoe.training.train import build_model

RECIPES = [Fp8Recipe(f, g) for g in ("rowwise", "tensorwise") for f in ("e4m3", "hybrid")]
BOUND = {E4M3: 0.05, E5M2: 0.075}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_scales_are_powers_of_two_that_fit_each_row(dtype):
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    q, scale_inv = quantize(x, dtype)
    mantissa, _ = torch.frexp(scale_inv)
    assert (mantissa == 0.5).all()  # powers of two: dequantizing is exact
    amax = x.abs().amax(1)
    scaled_amax = amax / scale_inv
    live = amax > 0
    assert (scaled_amax[live] <= FP8_MAX[dtype]).all() and (scaled_amax[live] > FP8_MAX[dtype] / 2).all()
    assert scale_inv[2] == 1.0 and (q[2].float() == 0).all()
    # each value is the nearest FP8 value of x * scale
    want = (x / scale_inv[:, None]).to(dtype)
    assert torch.equal(q.float(), want.float())
    assert _rel(dequantize(q, scale_inv), x) < (2 ** -4 if dtype == E4M3 else 2 ** -3)


def test_tensorwise_and_per_group_scales():
    x = torch.randn(8, 16)
    x[5] *= 100
    _, s = quantize(x, E4M3, "tensorwise")
    assert (s == s[5]).all()
    groups = (torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), 3)
    _, sg = quantize(x, E4M3, "tensorwise", row_group=groups)
    assert (sg[:3] == sg[0]).all() and (sg[3:6] == sg[5]).all() and sg[5] > sg[0] and (sg[6:] == sg[6]).all()
    # a reduction over ranks sees (and can raise) every row's amax
    _, sr = quantize(x, E4M3, "rowwise", reduce_amax=lambda a: a.fill_(1000.0))
    assert (sr == sr[0]).all() and sr[0] > s[0]


@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_quantize_transposed_is_quantize_of_each_transpose(granularity):
    x = torch.randn(3, 20, 12) * torch.logspace(-2, 2, 12)
    x[1, :, 4] = 0.0
    q, s = quantize_transposed(x, E4M3, granularity)
    assert q.shape == (3, 12, 20) and s.shape == (3, 12)
    for b in range(3):
        qb, sb = quantize(x[b].t(), E4M3, granularity)
        assert torch.equal(s[b], sb) and torch.equal(q[b].float(), qb.float())
    # the reduction sees each transposed row's amax (or each matrix's, tensorwise)
    seen = []
    quantize_transposed(x, E4M3, granularity, reduce_amax=lambda a: seen.append(a.clone()) or a)
    want = x.abs().amax(1)
    want = want if granularity == "rowwise" else want.amax(1, keepdim=True)
    assert torch.equal(seen[0], want)


def _reference_linear(x, w, recipe):
    """float64 products of the operands quantized as the recipe says (an independent reference)."""
    xd = dequantize(*quantize(x, E4M3, recipe.granularity)).double()
    wd = dequantize(*quantize(w, E4M3, recipe.granularity)).double()
    return xd @ wd.t()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.fmt}-{r.granularity}")
def test_fp8_linear_forward_and_backward(recipe):
    torch.manual_seed(0)
    x = torch.randn(3, 10, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    y = fp8_linear(x, w, recipe, Fp8WeightCache())
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 64), dy.reshape(-1, 48)
    torch.testing.assert_close(y.detach().reshape(-1, 48).double(), _reference_linear(x2, w.detach(), recipe),
                               rtol=1e-5, atol=1e-5)
    dyd = dequantize(*quantize(dy2, recipe.grad_dtype, recipe.granularity)).double()
    wtd = dequantize(*quantize(w.detach().t(), E4M3, recipe.granularity)).double()
    torch.testing.assert_close(x.grad.reshape(-1, 64).double(), dyd @ wtd.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), dy2.double().t() @ x2.double(), rtol=1e-5, atol=1e-5)  # bf16 wgrad
    exact = x2.double() @ w.detach().double().t()
    assert _rel(y.detach().reshape(-1, 48), exact) < BOUND[E4M3]
    assert _rel(x.grad.reshape(-1, 64), dy2.double() @ w.detach().double()) < BOUND[recipe.grad_dtype]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.fmt}-{r.granularity}")
def test_fp8_grouped_experts_forward_and_backward(recipe):
    """Both expert GEMMs, the second with the SwiGLU fused into its quantization, against the
    unquantized float64 experts (one expert receives no rows)."""
    torch.manual_seed(1)
    counts = [7, 0, 12, 21]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x = torch.randn(sum(counts), 64, requires_grad=True)
    w13 = (torch.randn(4, 96, 64) / 8).requires_grad_()
    w2 = (torch.randn(4, 64, 48) / 7).requires_grad_()
    h = fp8_grouped_linear(x, w13, offsets, recipe, Fp8WeightCache())
    y = fp8_grouped_linear(h, w2, offsets, recipe, Fp8WeightCache(), swiglu_input=True)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr, w13r, w2r = (t.detach().double().requires_grad_() for t in (x, w13, w2))
    rows = xr.split(counts)
    yr = torch.cat([swiglu(r @ w13r[e].t()) @ w2r[e].t() for e, r in enumerate(rows)])
    yr.backward(dy.double())
    assert _rel(y.detach(), yr.detach()) < 2 * BOUND[E4M3]  # two FP8 GEMMs in a row
    assert _rel(x.grad, xr.grad) < 2 * BOUND[recipe.expert_grad_dtype]
    # a GEMM in the activations' dtype, of the first FP8 GEMM's output h (its error times about
    # sqrt(2) through SwiGLU's product of gate and up)
    assert _rel(w2.grad, w2r.grad) < 2 * BOUND[E4M3]
    assert _rel(w13.grad, w13r.grad) < 2 * BOUND[recipe.expert_grad_dtype]  # dh: the FP8 dgrad, through SwiGLU at h
    assert (w13.grad[1] == 0).all() and (w2.grad[1] == 0).all()


def test_the_handed_off_gradient_quantization_is_the_one_it_replaces(monkeypatch):
    """With a GradHandoff the down projection's backward quantizes dh for the gate/up
    projection's backward: one quantization fewer there, and the same gradients bit for bit."""
    from megamoe.kernels import fp8_gemm

    torch.manual_seed(2)
    recipe, counts = Fp8Recipe("hybrid", "rowwise"), [9, 0, 14, 5]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x0, w13_0, w2_0 = torch.randn(28, 64), torch.randn(4, 96, 64) / 8, torch.randn(4, 64, 48) / 7
    dy = torch.randn(28, 64)
    calls = []
    quantize_in_gemms = fp8_gemm.quantize
    monkeypatch.setattr(fp8_gemm, "quantize", lambda *a, **k: calls.append(1) or quantize_in_gemms(*a, **k))

    def grads(handoff):
        x, w13, w2 = (t.clone().requires_grad_() for t in (x0, w13_0, w2_0))
        h = fp8_grouped_linear(x, w13, offsets, recipe, Fp8WeightCache(), "out", handoff=handoff)
        y = fp8_grouped_linear(h, w2, offsets, recipe, Fp8WeightCache(), "in", swiglu_input=True, handoff=handoff)
        calls.clear()
        y.backward(dy)
        return [t.grad for t in (x, w13, w2)], len(calls)

    (ref, ref_calls), (got, got_calls) = grads(None), grads(fp8_gemm.GradHandoff())
    assert (ref_calls, got_calls) == (2, 1)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_a_gradient_changed_on_its_way_is_quantized_afresh():
    from megamoe.kernels.fp8_gemm import GradHandoff

    handoff, dh = GradHandoff(), torch.randn(4, 8)
    handoff.put(dh, ("q", "s"))
    assert handoff.take(dh) == ("q", "s") and handoff.take(dh) is None  # given once
    handoff.put(dh, ("q", "s"))
    dh.mul_(2)  # a hook scaled it in place: its version moved
    assert handoff.take(dh) is None
    handoff.put(dh, ("q", "s"))
    assert handoff.take(dh + 0) is None  # another tensor (a sum with another path)


def test_the_weight_cache_requantizes_after_an_in_place_update():
    recipe, cache = Fp8Recipe("e4m3", "rowwise"), Fp8WeightCache()
    w = torch.nn.Parameter(torch.randn(16, 32))
    x = torch.randn(4, 32)
    y1 = fp8_linear(x, w, recipe, cache)
    first = cache._copies["w"]
    fp8_linear(x, w, recipe, cache)
    assert cache._copies["w"] is first  # same weight version: quantized once
    with torch.no_grad():
        w.mul_(2.0)  # as an optimizer step writes it
    y2 = fp8_linear(x, w, recipe, cache)
    assert cache._copies["w"] is not first
    torch.testing.assert_close(y2, 2 * y1)  # power-of-two scales: doubling is exact


def _fp8_config(layout: dict, recipe: str = "rowwise", **model):
    cfg = make_config("gqa" if layout.get("gqa") else "mla", layout)
    cfg.model.fp8_format, cfg.model.fp8_recipe = "hybrid", recipe
    cfg.moe.moe_fp8_dispatch = layout.get("fp8_dispatch", False)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_the_policy_keeps_the_head_router_and_end_layers_out_of_fp8():
    cfg = _fp8_config({}, first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1,
                      mtp_num_layers=1)
    model = build_model(cfg, ParallelState.single(), "cpu", dtype=torch.float32)
    fp8 = {name: m.fp8 for name, m in model.named_modules() if hasattr(m, "fp8")}
    assert all(v is None for n, v in fp8.items() if n.startswith(("layers.0.", "layers.3.", "mtp.")))
    assert all(v is not None for n, v in fp8.items() if n.startswith(("layers.1.", "layers.2.")))
    assert fp8["layers.1.ffn.experts"].granularity == "rowwise" and fp8["layers.1.ffn.shared_experts.w2"].fmt == "hybrid"
    assert fp8["head"] is None and not hasattr(model.layers["1"].ffn.gate, "fp8")  # the router: its own fp32 GEMM


def test_the_policy_keeps_small_dense_linears_out_of_fp8():
    """--fp8-min-linear-size: a dense linear runs in FP8 when out x in / (out + in) reaches it
    (computed here from each weight's shape), the routed experts always."""
    cfg = _fp8_config({}, fp8_min_linear_size=50)
    model = build_model(cfg, ParallelState.single(), "cpu", dtype=torch.float32)
    dense = {name: m for name, m in model.named_modules() if hasattr(m, "fp8") and hasattr(m, "weight")
             and name.startswith("layers.1.")}
    kept = {name for name, m in dense.items() if m.fp8 is not None}
    sizes = {name: m.weight.shape[0] * m.weight.shape[1] / (m.weight.shape[0] + m.weight.shape[1])
             for name, m in dense.items()}
    assert kept == {name for name, size in sizes.items() if size >= 50}
    assert kept and len(kept) < len(dense)  # the threshold splits this model's linears
    assert model.layers["1"].ffn.experts.fp8 is not None


def _fp8_step(layout: dict, recipe: str, num_dp: int):
    """One forward and backward of the FP8 model in float64 activations, each of ``num_dp``
    data-parallel ranks on its own sequences: the loss summed over them and every gradient
    summed as the optimizer sums it (over its gradient groups), as the global tensor. With an
    single process (torch.distributed not initialised): one process running every rank's
    sequences (the reference), with ``layout``'s other settings."""
    distributed = torch.distributed.is_initialized()
    cfg = _fp8_config(layout if distributed else {k: v for k, v in layout.items() if k in _SINGLE_KEYS}, recipe)
    state = ParallelState.build(**cfg.parallel.degrees()) if distributed else ParallelState.single()
    cfg.moe.moe_router_dtype = "fp64"
    model = build_model(cfg, state, "cpu", dtype=torch.float64)
    batches = [torch.randint(0, cfg.data.vocab_size, (2, cfg.model.seq_length),
                             generator=torch.Generator().manual_seed(7 + d)) for d in range(num_dp)]
    loss = torch.zeros((), dtype=torch.float64)
    for tokens in (batches[state.dp.rank:state.dp.rank + 1] if distributed else batches):
        out = model(tokens, torch.roll(tokens, -1, 1))
        out.lm_loss_sum.backward()
        loss += out.lm_loss_sum.detach()
    grads = {}
    for name, param in model.named_parameters():
        g = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        if distributed:
            _, group, first = spec_of(param).grad_groups(state)
            for grp in (first, group):
                if grp is not None:
                    mappings.all_reduce_(g, grp)
        grads[name] = gather_full(g, param, state)
    if distributed:
        mappings.all_reduce_(loss, state.dp_cp)
    return loss.item(), grads


_SINGLE_KEYS = ("dispatcher", "fp8_dispatch", "pad")  # the layout keys a single process keeps


@pytest.mark.parametrize("layout, world", [({"tp": 2, "sp": True}, 2), ({"ep": 2, "etp": 2, "dispatcher": "alltoall"}, 4)],
                         ids=["tp=2,sp", "ep=2,etp=2"])
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_model_under_tp_and_ep_matches_one_process(workers, layout, world, recipe):
    """The FP8 model's loss and gradients match the single-process FP8 model's.

    Rowwise: every scale depends on its own row only, so each layout quantizes exactly what one
    process does and the results agree to float64 summation order (1e-10). The test runs in
    float64 because in float32 the layouts' different summation orders (expert-TP partial sums)
    move values by ~1e-7, enough to flip an occasional FP8 rounding, which a tiny model
    amplifies to ~1e-2 (seen on one machine and not another).

    Tensorwise: the experts' activation scales are taken over the rows a rank holds for each
    expert (a TP rank's share of the sequence under SP; the EP group's tokens under EP), as in
    Megatron and Transformer Engine, which no single process running the ranks' micro-batches
    one by one reproduces: where such an amax falls in another power of two than one process's,
    that expert's values round differently. On these inputs that moves gradients by < 1e-6 (1e-4
    asserted); the last layer left out of FP8 moves them by 7e-2 (median). Whether a cut row's
    or tensor's amax is reduced over TP is checked where it can show, by construction:
    test_row_parallel_fp8_scales_whole_rows."""
    num_dp = world // layout.get("tp", 1)
    results = workers(world).run(_fp8_step, layout, recipe, num_dp)
    want_loss, want = _fp8_step({}, recipe, num_dp)
    tol = 1e-10 if recipe == "rowwise" else 1e-4
    for loss, grads in results:
        assert abs(loss - want_loss) <= tol * abs(want_loss)
        for name, g in grads.items():
            assert _rel(g, want[name]) < tol or (g - want[name]).abs().max() < 1e-12, name


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
def test_fp8_dispatch_changes_only_the_first_expert_weight_gradient(pad):
    """--moe-fp8-dispatch (one process): the tokens quantized before the permutation give the
    values the experts would quantize from their rows, so the loss and every gradient but the
    first expert GEMM's weight gradient are the same bits; that one is computed from the FP8
    rows instead of the rows, so it moves by about the e4m3 error. Also with the rows padded."""
    base = {"dispatcher": "alltoall", "pad": pad}
    want_loss, want = _fp8_step(base, "rowwise", 2)
    loss, grads = _fp8_step({**base, "fp8_dispatch": True}, "rowwise", 2)
    assert loss == want_loss
    moved = {name for name, g in grads.items() if not torch.equal(g, want[name])}
    assert moved == {f"layers.{i}.ffn.experts.w13" for i in (1, 2, 3)}, moved
    for name in moved:
        assert 1e-4 < _rel(grads[name], want[name]) < BOUND[E4M3], name


def test_fp8_dispatch_under_ep_and_expert_tp_matches_one_process(workers):
    """The FP8 rows and their scales cross EP and expert-TP and the bf16 gradients come back:
    the one-process FP8-dispatch model's loss and gradients up to float64 summation order."""
    layout = {"ep": 2, "etp": 2, "dispatcher": "alltoall", "fp8_dispatch": True}
    want_loss, want = _fp8_step(layout, "rowwise", 4)  # 4 data-parallel ranks: no TP
    for loss, grads in workers(4).run(_fp8_step, layout, "rowwise", 4):
        assert abs(loss - want_loss) <= 1e-10 * abs(want_loss)
        for name, g in grads.items():
            assert _rel(g, want[name]) < 1e-10 or (g - want[name]).abs().max() < 1e-12, name


def _row_parallel_fp8(recipe: str):
    from megamoe.parallel.tensor_parallel import RowParallelLinear

    state = ParallelState.build(tp=2) if torch.distributed.is_initialized() else ParallelState.single()
    layer = RowParallelLinear(64, 32, state.tp, fp8=Fp8Recipe("e4m3", recipe))
    layer.init_weights(torch.Generator().manual_seed(3))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    x[:, 32:] *= 2.0 ** -14  # the second TP rank's half: below e4m3's range at the first half's scale
    x = x.chunk(state.tp.size, dim=1)[state.tp.rank].requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y.detach(), mappings.all_gather(layer.weight.grad, state.tp, dim=1)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_row_parallel_fp8_scales_whole_rows(workers, recipe):
    """A row-parallel layer's input rows are cut over TP: each rank must scale its half with the
    whole row's amax (reduced over TP), as one process does, or the small half is quantized
    with a finer scale than one process gives it and the output differs."""
    want_y, want_dw = _row_parallel_fp8(recipe)
    for y, dw in workers(2).run(_row_parallel_fp8, recipe):
        torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dw, want_dw, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# GPU: the Triton kernels and torch's FP8 GEMMs


def _cuda():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with compute capability 9.0+")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_triton_quantization_matches_torch(dtype):
    from megamoe.kernels import fp8

    dev = _cuda()
    # row lengths quantized whole in tiles (2048, 2816, 100: a partial tile) and in a loop (10000);
    # 301 rows: the last tile holds fewer rows than the others
    for cols in (2048, 2816, 100, 10000):
        x = (torch.randn(301, cols, device=dev) * torch.logspace(-4, 4, 301, device=dev)[:, None]).bfloat16()
        x[7] = 0
        given = x.float().abs().amax(1) * torch.rand(301, device=dev).add(1)  # a reduced amax is larger
        for amax in (None, given):
            q, s = fp8.quantize_with_amax(x, dtype, amax) if amax is not None else fp8.quantize(x, dtype)
            q_ref, s_ref = fp8._quantize_torch(x, dtype, amax)
            assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float()), (cols, amax is None)
    h = torch.randn(300, 2 * 1408, device=dev).bfloat16()
    qa, sa = fp8.swiglu_quantize(h, dtype)
    qa_ref, sa_ref = fp8._quantize_torch(swiglu(h), dtype, None)
    assert torch.equal(sa, sa_ref)
    # silu in float32 in both, before the activation is rounded to bf16: at most one FP8 step apart
    step = 2.0 ** -3 if dtype == E4M3 else 2.0 ** -2
    diff = (qa.float() - qa_ref.float()).abs()
    assert (diff <= step * qa_ref.float().abs() + 2.0 ** -9).all() and (diff > 0).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_triton_transposed_quantization_matches_torch(granularity):
    from megamoe.kernels import fp8

    dev = _cuda()
    # ragged sizes (not multiples of the 64 x 64 tile) and a zero column
    w = (torch.randn(5, 300, 200, device=dev) * torch.logspace(-3, 3, 200, device=dev)).bfloat16()
    w[2, :, 9] = 0
    q, s = fp8.quantize_transposed(w, E4M3, granularity)
    for b in range(w.shape[0]):
        q_ref, s_ref = fp8.quantize(w[b].t().contiguous(), E4M3, granularity)
        assert torch.equal(s[b], s_ref) and torch.equal(q[b].float(), q_ref.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_fused_swiglu_backward_quantization_matches_the_two_kernels(dtype):
    from megamoe.kernels.fp8 import swiglu_backward, swiglu_backward_quantize

    dev = _cuda()
    for rows, cols in ((501, 1408), (37, 100)):  # a partial last tile; a row shorter than its tile
        h = (torch.randn(rows, 2 * cols, device=dev) * torch.logspace(-3, 3, rows, device=dev)[:, None]).bfloat16()
        da = torch.randn(rows, cols, device=dev).bfloat16()
        da[5] = 0  # a zero gradient row: scale 1
        dh, a, q, s = swiglu_backward_quantize(h, da, dtype)
        dh_ref, a_ref = swiglu_backward(h, da)
        q_ref, s_ref = quantize(dh_ref, dtype)
        assert torch.equal(dh, dh_ref) and torch.equal(a, a_ref)
        assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


@pytest.mark.gpu
def test_triton_swiglu_backward_matches_autograd():
    from megamoe.kernels.fp8 import swiglu_backward

    dev = _cuda()
    h = torch.randn(500, 2 * 1408, device=dev).bfloat16()
    da = torch.randn(500, 1408, device=dev).bfloat16()
    dh, a = swiglu_backward(h, da)
    hr = h.float().requires_grad_()
    ar = swiglu(hr)
    (dh_ref,) = torch.autograd.grad(ar, hr, da.float())
    torch.testing.assert_close(a.float(), ar.detach().bfloat16().float(), rtol=8e-3, atol=1e-5)  # bf16 rounding
    torch.testing.assert_close(dh.float(), dh_ref, rtol=8e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.fmt}-{r.granularity}")
def test_fp8_experts_on_the_gpu_against_bf16(recipe):
    """The V2-Lite proxy's expert shapes (64 experts, D 2048, F 1408, one expert empty and sizes
    that are not multiples of 16): torch._scaled_grouped_mm with the Triton quantization against
    the same experts in bf16 (torch._grouped_mm), within the bounds of the module docstring."""
    from megamoe.model.experts import GroupedExperts

    dev = _cuda()
    torch.manual_seed(0)
    counts = torch.randint(0, 400, (64,))
    counts[3] = 0
    kw = dict(num_experts=64, num_local_experts=64, first_expert=0, hidden_size=2048, ffn_hidden_size=1408,
              etp=ParallelState.single().etp, backend="torch", device=dev, dtype=torch.bfloat16)
    fp8_experts, bf16_experts = GroupedExperts(fp8=recipe, **kw), GroupedExperts(**kw)
    fp8_experts.init_weights(torch.Generator(device=dev).manual_seed(1))
    bf16_experts.load_state_dict(fp8_experts.state_dict())
    x = torch.randn(int(counts.sum()), 2048, device=dev, dtype=torch.bfloat16)
    tpe = counts.to(dev)
    outs = []
    for experts in (fp8_experts, bf16_experts):
        xi = x.clone().requires_grad_()
        y = experts(xi, tpe)
        y.backward(torch.ones_like(y) * 1e-2)
        outs.append((y.float(), xi.grad.float(), experts.w13.grad.float(), experts.w2.grad.float()))
    (y, dx, dw13, dw2), (y_ref, dx_ref, dw13_ref, dw2_ref) = outs
    assert _rel(y, y_ref) < 2 * BOUND[E4M3]
    assert _rel(dx, dx_ref) < 2 * BOUND[recipe.expert_grad_dtype]
    assert _rel(dw2, dw2_ref) < 2 * BOUND[E4M3] and _rel(dw13, dw13_ref) < 2 * BOUND[recipe.expert_grad_dtype]
    assert dw13[3].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.fmt}-{r.granularity}")
def test_fp8_linear_on_the_gpu_against_its_dequantized_operands(recipe):
    dev = _cuda()
    torch.manual_seed(0)
    x = torch.randn(4096, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(3072, 2048, device=dev) / 45).bfloat16().requires_grad_()
    y = fp8_linear(x, w, recipe, Fp8WeightCache())
    dy = torch.randn_like(y)
    y.backward(dy)
    want = _reference_linear(x.detach(), w.detach(), recipe)
    assert _rel(y, want) < 4e-3  # the products are exact; bf16 output rounding and fast accumulation
    dyd = dequantize(*quantize(dy, recipe.grad_dtype, recipe.granularity)).double()
    wtd = dequantize(*quantize(w.detach().t(), E4M3, recipe.granularity)).double()
    assert _rel(x.grad, dyd @ wtd.t()) < 4e-3
    assert _rel(y, x.detach().double() @ w.detach().double().t()) < BOUND[E4M3]


TE_RECIPES = [Fp8Recipe("hybrid", g, transformer_engine=True) for g in ("delayed", "tensorwise", "blockwise")]


def _te():
    dev = _cuda()
    pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
    return dev


def _te_steps(fn, steps: int):
    """``fn()`` ``steps`` times (the delayed recipe's first call scales by 1: its amax history
    is empty), returning the last call's results."""
    for _ in range(steps):
        out = fn()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", TE_RECIPES, ids=lambda r: f"te-{r.granularity}")
def test_te_fp8_experts_on_the_gpu_against_bf16(recipe):
    """TE GroupedLinear experts under each TE recipe (row counts padded to 16, as the dispatcher
    pads them, one expert empty) against the same experts in bf16 (torch._grouped_mm): the
    bounds of the module docstring, doubled for the chained GEMMs, e5m2 for the gradients."""
    from megamoe.model.experts import GroupedExperts

    dev = _te()
    torch.manual_seed(0)
    counts = torch.randint(0, 25, (64,)) * 16
    counts[3] = 0
    kw = dict(num_experts=64, num_local_experts=64, first_expert=0, hidden_size=2048, ffn_hidden_size=1408,
              etp=ParallelState.single().etp, device=dev, dtype=torch.bfloat16)
    te_experts, bf16_experts = GroupedExperts(backend="te", fp8=recipe, **kw), GroupedExperts(backend="torch", **kw)
    te_experts.init_weights(torch.Generator(device=dev).manual_seed(1))
    bf16_experts.init_weights(torch.Generator(device=dev).manual_seed(1))
    x = torch.randn(int(counts.sum()), 2048, device=dev, dtype=torch.bfloat16)
    tpe = counts.to(dev)

    def step(experts):
        for p in experts.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = experts(xi, tpe)
        y.backward(torch.ones_like(y) * 1e-2)
        w = experts.stacked(grads=True)
        return y.float(), xi.grad.float(), w["w1"].float(), w["w2"].float()

    y, dx, dw1, dw2 = _te_steps(lambda: step(te_experts), 3)
    y_ref, dx_ref, dw1_ref, dw2_ref = step(bf16_experts)
    assert _rel(y, y_ref) < 2 * BOUND[E4M3]
    assert _rel(dx, dx_ref) < 2 * BOUND[E5M2]
    assert _rel(dw2, dw2_ref) < 2 * BOUND[E5M2] and _rel(dw1, dw1_ref) < 2 * BOUND[E5M2]
    assert dw1[3].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", TE_RECIPES, ids=lambda r: f"te-{r.granularity}")
def test_te_fp8_linear_on_the_gpu_against_float64(recipe):
    """A column-parallel linear on te.Linear (the megamoe layer's own weight, borrowed) against
    float64 products of its bf16 operands: one GEMM's bound, e5m2 for the gradients."""
    from megamoe.parallel.tensor_parallel import ColumnParallelLinear

    dev = _te()
    torch.manual_seed(0)
    layer = ColumnParallelLinear(2048, 3072, ParallelState.single().tp, fp8=recipe, device=dev, dtype=torch.bfloat16)
    layer.init_weights(torch.Generator(device=dev).manual_seed(2))
    x = torch.randn(4096, 1, 2048, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(4096, 1, 3072, device=dev, dtype=torch.bfloat16)

    def step():
        layer.weight.grad = None
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        return y, xi.grad, layer.weight.grad

    y, dx, dw = _te_steps(step, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # TE's module adds no parameter
    xd, wd, dyd = x.double().view(4096, 2048), layer.weight.detach().double(), dy.double().view(4096, 3072)
    assert _rel(y.view(4096, 3072), xd @ wd.t()) < BOUND[E4M3]
    assert _rel(dx.view(4096, 2048), dyd @ wd) < BOUND[E5M2]
    assert _rel(dw, dyd.t() @ xd) < BOUND[E5M2]
