"""Piece runs (``parallel/pieces.py``): a forward cut into autograd islands and backpropagated
island by island gives autograd's gradients of the whole graph (float64), also with a value
read by two later pieces, a weighted loss produced midway, a non-tensor passed along, and two
runs interleaved; the model's and the schedule's use of them is checked against the single
process in tests/model/test_model_parallel_parity.py (``moe_overlap``)."""

from __future__ import annotations

import torch

from megamoe.parallel.pieces import Piece, PieceRun, interleave

DT = torch.float64


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 4, dtype=DT, generator=g).requires_grad_() for _ in range(3)]


def _pieces(w, log: list):
    def first(x):
        log.append("first")
        h = torch.tanh(x @ w[0])
        return {"h": h, "aux": h.square().mean(), "ctx": {"scale": 2.0}}

    def second(h, ctx):
        log.append("second")
        return {"g": torch.sin(h @ w[1]) * ctx["scale"]}

    def third(h, g):  # h is read twice: by `second` and here
        log.append("third")
        return {"y": (h + g) @ w[2]}

    return [Piece("first", ("x",), first), Piece("second", ("h", "ctx"), second), Piece("third", ("h", "g"), third)]


def _whole(w, x, grad_y, aux_weight):
    h = torch.tanh(x @ w[0])
    y = (h + torch.sin(h @ w[1]) * 2.0) @ w[2]
    torch.autograd.backward([y, h.square().mean()], [grad_y, torch.tensor(aux_weight, dtype=DT)])


def test_piecewise_backward_is_the_whole_graphs():
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(9), requires_grad=True)
    grad_y = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(10))
    w, ref = _weights(1), _weights(1)
    _whole(ref, x, grad_y, 0.5)
    want_dx = x.grad.clone()
    x.grad = None
    run = PieceRun(_pieces(w, []), {"x": x}, {"aux": 0.5}, output="y")
    run.forward()
    assert all(p.grad is None for p in w)  # nothing backpropagated yet
    run.backward(grad_y)
    for got, want in zip(w, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(run.grad("x"), want_dx, rtol=1e-14, atol=1e-15)
    assert x.grad is None  # the run's input collects its gradient in run.grad, not in x


def test_two_runs_interleaved_alternate_and_sum_like_accumulation():
    xs = [torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    grads = [torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    w, ref = _weights(5), _weights(5)
    for x, g in zip(xs, grads):
        _whole(ref, x, g, 1.0)
    log: list = []
    first = PieceRun(_pieces(w, log), {"x": xs[0]}, {"aux": 1.0}, output="y")
    first.forward()
    second = PieceRun(_pieces(w, log), {"x": xs[1]}, {"aux": 1.0}, output="y")
    backward_log = []
    steps = first.backward_steps(grads[0])

    def logged():
        for _ in steps:
            backward_log.append(len(log))
            yield

    interleave(second.forward_steps(), logged())
    second.backward(grads[1])
    assert backward_log == [4, 5, 6]  # each backward piece after one more forward piece
    for got, want in zip(w, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-14, atol=1e-15)


def test_delayed_weight_gradients_run_after_each_pieces_backward():
    """--delay-wgrad-compute: a piece's deferrable weight gradient is computed after its
    backward returns (after the input gradient it passes on, and whatever that backward
    started), before the next piece's backward; the gradients are autograd's."""
    from megamoe.parallel.weight_grad import WeightGradStore, linear

    store, log = WeightGradStore(), []
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    w, ref = _weights(7), _weights(7)
    for i, p in enumerate(w):  # the hook also fires, without a gradient, where the backward defers it
        p.register_post_accumulate_grad_hook(lambda p, i=i: log.append(("W", i)) if p.grad is not None else None)

    def first(x):
        return {"h": torch.tanh(linear(x, w[0], None, store))}

    def second(h):
        h = _LogBackward.apply(h, log, "second's input gradient")
        return {"y": torch.sin(linear(h, w[1], None, store))}

    run = PieceRun([Piece("first", ("x",), first), Piece("second", ("h",), second)], {"x": x}, {}, output="y",
                   delay_weight_grads=store)
    run.forward()
    grad_y = torch.ones(3, 4, dtype=DT)
    run.backward(grad_y)
    assert log == [("second's input gradient",), ("W", 1), ("W", 0)]
    torch.autograd.backward(torch.sin(torch.tanh(x @ ref[0].t()) @ ref[1].t()), grad_y)
    for got, want in zip(w[:2], ref[:2]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-14, atol=1e-15)
    # inside a zero-bubble schedule's deferral the weight gradients stay deferred to its W
    for p in w:
        p.grad = None
    run = PieceRun([Piece("first", ("x",), first), Piece("second", ("h",), second)], {"x": x}, {}, output="y",
                   delay_weight_grads=store)
    run.forward()
    with store.deferring():
        run.backward(grad_y)
    assert w[0].grad is None and w[1].grad is None and len(store) == 1
    store.run_next()
    torch.testing.assert_close(w[1].grad, ref[1].grad, rtol=1e-14, atol=1e-15)


class _LogBackward(torch.autograd.Function):
    """Identity that logs when its backward runs (the input gradient passing the cut)."""

    @staticmethod
    def forward(ctx, x, log, what):
        ctx.log, ctx.what = log, what
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append((ctx.what,))
        return grad, None, None
