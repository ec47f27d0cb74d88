"""Deferred weight gradients: a backward inside ``WeightGradStore.deferring()`` gives the input
gradient at once and the weight gradient only at ``run_next``, equal to autograd's own (float64,
against ``F.linear`` and per-expert matmuls), through the weight's post-accumulate hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe.parallel.weight_grad import WeightGradStore, grouped_linear, linear

DT = torch.float64


def _reference(x, weight, bias, fn):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = fn(x, weight, bias)
    (y.sin().sum()).backward()
    return x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("deferred", [False, True])
def test_linear_defers_only_the_weight_gradient(deferred):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, dtype=DT, generator=g) for shape in ((3, 2, 5), (4, 5), (4,)))
    want_dx, want_dw, want_db = _reference(x, w, b, F.linear)
    weight, bias = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    hooked = []
    # autograd calls the hook with no gradient where it was deferred; the gradient comes at W
    weight.register_post_accumulate_grad_hook(lambda p: hooked.append(p.grad is not None))
    xs = x.clone().requires_grad_()
    store = WeightGradStore()
    with store.deferring(deferred):
        linear(xs, weight, bias, store).sin().sum().backward()
    torch.testing.assert_close(xs.grad, want_dx, rtol=1e-14, atol=0)
    torch.testing.assert_close(bias.grad, want_db, rtol=1e-14, atol=0)  # biases never wait
    assert (weight.grad is None) == deferred and len(store) == int(deferred)
    if deferred:
        store.run_next()
    torch.testing.assert_close(weight.grad, want_dw, rtol=1e-14, atol=1e-15)
    assert hooked == [False, True] if deferred else hooked == [True]
    assert len(store) == 0


def test_grouped_linear_defers_each_experts_weight_gradient():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([3, 0, 4])  # an expert without rows gets a zero gradient
    x, w = torch.randn(7, 5, dtype=DT, generator=g), torch.randn(3, 4, 5, dtype=DT, generator=g)

    def per_expert(x_, w_, _):
        return torch.cat([x_e @ w_[e].t() for e, x_e in enumerate(x_.split(counts.tolist()))])

    want_dx, want_dw, _ = _reference(x, w, None, per_expert)
    weight, xs, store = torch.nn.Parameter(w.clone()), x.clone().requires_grad_(), WeightGradStore()
    with store.deferring():
        grouped_linear(xs, weight, counts, store, grouped_mm=False).sin().sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(xs.grad, want_dx, rtol=1e-14, atol=1e-15)
    store.run_next()
    torch.testing.assert_close(weight.grad, want_dw, rtol=1e-14, atol=1e-15)
    assert (weight.grad[1] == 0).all()


def test_groups_run_in_order_and_an_extra_w_is_an_error():
    store, weight = WeightGradStore(), torch.nn.Parameter(torch.ones(2, 2, dtype=DT))
    for scale in (1.0, 10.0):
        with store.deferring():
            (linear(torch.ones(1, 2, dtype=DT), weight, None, store) * scale).sum().backward()
    store.run_next()
    torch.testing.assert_close(weight.grad, torch.ones(2, 2, dtype=DT))  # the first backward's
    store.run_next()
    torch.testing.assert_close(weight.grad, torch.full((2, 2), 11.0, dtype=DT))
    with pytest.raises(RuntimeError, match="no deferred weight gradients"):
        store.run_next()


@pytest.mark.gpu
def test_grouped_mm_path_on_the_gpu_matches_autograd():
    """bf16 on CUDA: the deferred grouped GEMMs (torch._grouped_mm for dx and for each expert's
    dW) against autograd through torch._grouped_mm, to bf16 rounding."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a CUDA GPU with compute capability 9.0+")
    g = torch.Generator(device="cuda").manual_seed(2)
    counts = torch.tensor([64, 0, 200, 48], device="cuda")
    x = torch.randn(312, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)

    def autograd_mm(x_, w_, _):
        return torch._grouped_mm(x_, w_.transpose(-2, -1), offs=offsets)

    want_dx, want_dw, _ = _reference(x, w, None, autograd_mm)
    weight, xs, store = torch.nn.Parameter(w.clone()), x.clone().requires_grad_(), WeightGradStore()
    with store.deferring():
        grouped_linear(xs, weight, counts, store, grouped_mm=True).sin().sum().backward()
    store.run_next()
    torch.testing.assert_close(xs.grad, want_dx)
    torch.testing.assert_close(weight.grad, want_dw)
