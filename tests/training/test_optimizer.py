"""The optimizer against torch's own parts: gradient clipping folded into a fused AdamW step
gives the update of ``torch.nn.utils.clip_grad_norm_`` followed by an unfused AdamW; Adam's
moments in bf16 against AdamW written out in float64."""

from __future__ import annotations

import copy
import math

import pytest

import torch
import torch.nn as nn

from megamoe.config import TrainingConfig
from megamoe.parallel.state import ParallelState
from megamoe.training.moments_adamw import MomentsAdamW
from megamoe.training.optimizer import MixedPrecisionAdamW


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
    return model(x).square().sum() * 50  # gradients far above the clip


def test_clip_folded_into_the_fused_step_matches_clipping_the_gradients(monkeypatch):
    real_adamw = torch.optim.AdamW
    # the CUDA path (fused=True) on CPU, where torch also has a fused AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, fused=None, **k: real_adamw(*a, fused=True, **k))
    t = TrainingConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5)
    model = _model()
    ref = copy.deepcopy(model)
    opt = MixedPrecisionAdamW(model, t, ParallelState.single())
    assert opt.optimizer.defaults["fused"]
    ref_opt = real_adamw([{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": t.weight_decay},
                          {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                         lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
    for step, max_norm in enumerate((t.clip_grad, t.clip_grad, 1e9)):  # the last step needs no clip
        opt.zero_grad()
        _loss(model, step).backward()
        opt.finish_grad_sync()
        norm = opt.clip_grad_norm(max_norm)
        unclipped = torch.linalg.vector_norm(torch.stack([p.main_grad.norm() for p in opt.params])).item()
        opt.step(t.lr)

        ref_opt.zero_grad()
        _loss(ref, step).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
        ref_opt.step()

        assert norm > 10 * t.clip_grad
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm
        assert abs(unclipped - norm) <= 1e-5 * norm  # the step applied the clip, the gradients kept theirs
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moments", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_bf16_moments_against_adamw_in_float64(moments):
    """MomentsAdamW against AdamW's equations in float64 whose moments are rounded to the given
    dtype after each update (the update itself uses them unrounded), over five steps with weight
    decay. The weights agree to float32 rounding (1e-6 against updates of ~1e-2); the bf16
    moments are the rounded float64 ones, bar a neighbouring bf16 value where float32 arithmetic
    lands on the other side of a rounding boundary."""
    torch.manual_seed(0)
    lr, (beta1, beta2), eps, decay = 1e-2, (0.9, 0.95), 1e-8, 0.1
    master = torch.randn(64, 48)
    opt = MomentsAdamW([master], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay, moment_dtypes=moments)
    p, m, v = master.double(), torch.zeros(64, 48, dtype=torch.float64), torch.zeros(64, 48, dtype=torch.float64)
    for step in range(1, 6):
        g = torch.randn(64, 48) * 3
        master.grad = g
        opt.step()
        g = g.double()
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * decay) - lr / (1 - beta1 ** step) * m / (v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps)
        m, v = m.to(moments[0]).double(), v.to(moments[1]).double()
        torch.testing.assert_close(master.double(), p, rtol=1e-6, atol=1e-6)
        for key, want, dtype in (("exp_avg", m, moments[0]), ("exp_avg_sq", v, moments[1])):
            got = opt.state[master][key]
            assert got.dtype == dtype
            step_of_largest = want.abs().max() * torch.finfo(dtype).eps
            assert (got.double() - want).abs().max() <= step_of_largest, (key, step)
            if dtype == torch.bfloat16:  # (a float32 moment differs from float64's in its last bits)
                assert (got.double() == want).double().mean() > 0.99, (key, step)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _adamw_cases(device, chunk: int):
    """Shapes around the kernel's chunk: smaller, not a multiple, several chunks."""
    torch.manual_seed(0)
    return [torch.randn(s, device=device) for s in [(3, 5), (chunk + 7,), (3 * chunk // 1024 + 1, 1024), (64, 64)]]


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_triton_adamw_against_torch_adamw(grad_dtype):
    """The Triton step against torch's single-tensor AdamW (float32, a different code path), with
    and without a grad_scale, over four steps (the bias corrections move); the bf16 copies are
    the masters rounded, and their versions move. The no-decay group's lengths take the
    kernel's unaligned path, the decay group's its 16-byte one; one master has no copy. bf16
    gradients (new tensors each step, the reference given their float32 values) read as well."""
    from megamoe.kernels.adamw import CHUNK
    from megamoe.testing.adamw_steps import steps_against_torch
    dev = _cuda()
    masters = _adamw_cases(dev, CHUNK)
    with_copy = [masters[0], masters[2], masters[3]]
    copies = [m.bfloat16() for m in with_copy]
    versions = [c._version for c in copies]
    for opt, ref_opt, ref in steps_against_torch(masters, dict(zip(with_copy, copies)), grad_dtype=grad_dtype):
        for m, r in zip(masters, ref):  # one update moves a weight by ~lr: 1e-5 of it is far below
            torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[m]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        for m, c in zip(with_copy, copies):
            assert torch.equal(c, m.bfloat16())
    assert all(c._version > v for c, v in zip(copies, versions))
    assert [[aligned for *_, aligned in opt._tables[g][1]] for g in (0, 1)] == [[True], [False, False]]
    assert int(opt.state[masters[0]]["step"]) == 4


@pytest.mark.gpu
def test_triton_adamw_with_bf16_moments_against_torch_ops():
    """bf16 moments: the kernel against MomentsAdamW (torch ops, float32 arithmetic, bf16
    storage), both rounding to nearest. Their float32 arithmetic differs in order, so a moment
    can round to the neighbouring bf16 value, and the next steps carry that on: moments within
    two bf16 steps of each tensor's largest; weights within 1e-4, the change a moment one bf16
    step (2**-8) off makes to updates of ~1e-2 over the steps that carry it (measured on an
    H200: 2.5e-5 at most), where a wrong bias correction or scale is off by ~1e-3."""
    from megamoe.kernels.adamw import CHUNK
    from megamoe.testing.adamw_steps import steps_against_torch
    dev = _cuda()
    masters = _adamw_cases(dev, CHUNK)
    bf16 = (torch.bfloat16, torch.bfloat16)
    for opt, ref_opt, ref in steps_against_torch(masters, {}, moment_dtypes=bf16):
        for m, r in zip(masters, ref):
            torch.testing.assert_close(m, r, rtol=0, atol=1e-4)
            for key in ("exp_avg", "exp_avg_sq"):
                got, want = opt.state[m][key], ref_opt.state[r][key]
                assert got.dtype == want.dtype == torch.bfloat16
                assert (got.float() - want.float()).abs().max() <= 2 * 2 ** -7 * want.float().abs().max()
                assert (got == want).float().mean() > 0.99  # a neighbouring value is the exception


@pytest.mark.gpu
@pytest.mark.parametrize("distributed", [False, True])
def test_the_step_on_cuda_writes_the_bf16_parameters(distributed):
    """On CUDA the optimizer's step itself leaves the bf16 parameters equal to the masters
    (the distributed optimizer: written into the parameter buffer, gathered in place)."""
    from megamoe.config import ParallelConfig
    from megamoe.training.distributed_optimizer import DistributedOptimizer

    dev = _cuda()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(dev, torch.bfloat16)
    t = TrainingConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5)
    if distributed:
        opt = DistributedOptimizer(model, t, ParallelState.single(), ParallelConfig())
        assert all(opt.step_writes_shard.values())
    else:
        opt = MixedPrecisionAdamW(model, t, ParallelState.single())
        assert opt.step_writes_params
    before = [p.detach().clone() for p in opt.params]
    for step in range(2):
        opt.zero_grad()
        model(torch.randn(64, 16, device=dev, dtype=torch.bfloat16)).square().sum().backward()
        opt.finish_grad_sync()
        opt.clip_grad_norm(0.5)
        opt.step(1e-2)
    masters = {p: m for p, _, m in opt.master_pieces()}  # one piece per parameter on one rank
    for p, b in zip(opt.params, before):
        assert torch.equal(p.detach(), masters[p].view_as(p).bfloat16()) and not torch.equal(p, b)


@pytest.mark.gpu
def test_a_single_pass_step_reads_the_bf16_gradients_with_the_same_result():
    """One micro-batch on one rank: the step reads the bf16 gradients themselves (no float32
    main-gradient copy); the float32 copy path (a step announced without a count) gives the
    same weights bit for bit, since the copy is exact, and the same grad norm to float32
    rounding (its sums run over other inputs)."""
    dev = _cuda()
    runs = []
    for announce in (1, None):
        model = _model().to(dev, torch.bfloat16)
        opt = MixedPrecisionAdamW(model, TrainingConfig(lr=1e-2, weight_decay=0.1), ParallelState.single())
        norms = []
        for step in range(3):
            opt.zero_grad(announce)
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step)).to(dev, torch.bfloat16)
            model(x).square().sum().backward()
            opt.finish_grad_sync()
            assert all((p.main_grad.dtype == torch.bfloat16) == (announce == 1) for p in opt.params)
            norms.append(opt.clip_grad_norm(0.0))
            opt.step(1e-2)
        runs.append(([p.detach().clone() for p in opt.params], norms))
    (aliased, aliased_norms), (copied, copied_norms) = runs
    for a, c in zip(aliased, copied):
        assert torch.equal(a, c)
    assert aliased_norms == pytest.approx(copied_norms, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_the_step_decided_on_the_device_matches_the_hosts_decision(clip):
    """The Triton step reads the clip's divisor and the verdict on a non-finite norm from the
    device, so the host launches it before reading the norm. Against the host deciding
    (``skips_on_device`` off: the norm read first, the divisor filled in, a non-finite step
    not launched): the same norms and weights bit for bit, and the step whose gradients hold
    an infinity changes no weight and no step count."""
    dev = _cuda()
    runs = []
    for on_device in (True, False):
        model = _model().to(dev, torch.bfloat16)
        opt = MixedPrecisionAdamW(model, TrainingConfig(lr=1e-2, weight_decay=0.1), ParallelState.single())
        assert opt.skips_on_device
        opt.skips_on_device = on_device
        norms, weights = [], []
        for step in range(3):
            opt.zero_grad(1)
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step)).to(dev, torch.bfloat16)
            (model(x).square().sum() * (float("inf") if step == 1 else 50.0)).backward()
            opt.finish_grad_sync()
            pending = opt.start_clip_grad_norm(clip)
            if on_device:
                opt.step(1e-2)
            norm = pending.read()
            if not on_device:
                opt.step(1e-2) if math.isfinite(norm) else opt.skip_step()
            norms.append(norm)
            weights.append([p.detach().clone() for p in opt.params])
        assert not math.isfinite(norms[1]) and math.isfinite(norms[0]) and math.isfinite(norms[2])
        assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # the skipped step
        assert not any(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
        assert opt.step_count() == 2
        if clip:
            assert norms[0] > clip and norms[2] > clip  # the clip was due
        runs.append((norms, weights))
    (device_norms, device_weights), (host_norms, host_weights) = runs
    assert device_norms[0::2] == host_norms[0::2]
    for got, want in zip(device_weights, host_weights):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
def test_triton_adamw_skips_a_step_on_found_inf():
    """``found_inf`` 1 with NaN gradients: nothing changes, the step count included; 0: the
    step goes through (against torch's AdamW, which takes only the other steps)."""
    from megamoe.kernels.adamw import CHUNK
    from megamoe.testing.adamw_steps import steps_against_torch
    masters = _adamw_cases(_cuda(), CHUNK)
    for opt, ref_opt, ref in steps_against_torch(masters, {}, grad_dtype=torch.bfloat16, skip_at=1):
        for m, r in zip(masters, ref):
            torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-6)
    assert {int(opt.state[m]["step"]) for m in masters} == {3}
