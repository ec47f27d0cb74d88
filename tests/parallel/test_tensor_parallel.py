"""Tensor-parallel layers at TP=2 and 4, with and without sequence parallel, against the
single-process torch reference (nn.functional.linear / embedding / cross_entropy) in float64.

Each rank builds the full reference from the same seed, runs its shard, and compares the
output, the input gradient and the weight gradient with the slice it owns. Tolerance: 1e-10
relative in float64 (only summation order differs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.parallel import tensor_parallel as tpl
from megamoe.parallel.cross_entropy import linear_cross_entropy
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, model_parallel_seed
from megamoe.parallel.state import ParallelState
from megamoe.testing.distributed import worker_device

DT = torch.float64
S, B, IN, OUT, VOCAB = 8, 3, 12, 16, 32
TOL = dict(rtol=1e-10, atol=1e-12)


def _state(tp: int) -> ParallelState:
    return ParallelState.build(tp=tp)


def _seq_slice(x: torch.Tensor, state: ParallelState, sp: bool) -> torch.Tensor:
    return x.chunk(state.tp.size, 0)[state.tp.rank] if sp else x


def _gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def _column(tp: int, sp: bool, bias: bool):
    state, device = _state(tp), worker_device()
    r, n = state.tp.rank, state.tp.size
    layer = tpl.ColumnParallelLinear(IN, OUT, state.tp, bias=bias, sequence_parallel=sp, device=device, dtype=DT)
    layer.init_weights(_gen(device))
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1, 1, OUT, dtype=DT, device=device).chunk(n)[r])
    w_full = torch.empty(OUT, IN, dtype=torch.float32, device=device).normal_(0, 0.02, generator=_gen(device)).to(DT)
    b_full = torch.linspace(-1, 1, OUT, dtype=DT, device=device) if bias else None
    x = torch.randn(S, B, IN, dtype=DT, device=device, generator=_gen(device, 1))
    g = torch.randn(S, B, OUT, dtype=DT, device=device, generator=_gen(device, 2))

    # reference
    x_ref, w_ref = x.clone().requires_grad_(), w_full.clone().requires_grad_()
    (F.linear(x_ref, w_ref, b_full) * g).sum().backward()

    x_in = _seq_slice(x, state, sp).clone().requires_grad_()
    y = layer(x_in)
    g_mine = g.chunk(n, -1)[r]
    (y * g_mine).sum().backward()
    torch.testing.assert_close(y, F.linear(x, w_full, b_full).chunk(n, -1)[r], **TOL)
    torch.testing.assert_close(x_in.grad, _seq_slice(x_ref.grad, state, sp), **TOL)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad.chunk(n, 0)[r], **TOL)
    return True


def _row(tp: int, sp: bool, bias: bool):
    state, device = _state(tp), worker_device()
    r, n = state.tp.rank, state.tp.size
    layer = tpl.RowParallelLinear(IN, OUT, state.tp, bias=bias, sequence_parallel=sp, device=device, dtype=DT)
    layer.init_weights(_gen(device))
    w_full = torch.empty(OUT, IN, dtype=torch.float32, device=device).normal_(0, 0.02, generator=_gen(device)).to(DT)
    b_full = torch.linspace(-1, 1, OUT, dtype=DT, device=device)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(b_full)
    x = torch.randn(S, B, IN, dtype=DT, device=device, generator=_gen(device, 1))
    g = torch.randn(S, B, OUT, dtype=DT, device=device, generator=_gen(device, 2))

    x_ref, w_ref = x.clone().requires_grad_(), w_full.clone().requires_grad_()
    b_ref = b_full.clone().requires_grad_()
    (F.linear(x_ref, w_ref, b_ref if bias else None) * g).sum().backward()

    x_in = x.chunk(n, -1)[r].clone().requires_grad_()
    y = layer(x_in)
    (y * _seq_slice(g, state, sp)).sum().backward()
    tpl.all_reduce_sequence_parallel_grads(layer, state.tp)
    torch.testing.assert_close(y, _seq_slice(F.linear(x, w_full, b_full if bias else None), state, sp), **TOL)
    torch.testing.assert_close(x_in.grad, x_ref.grad.chunk(n, -1)[r], **TOL)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad.chunk(n, 1)[r], **TOL)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **TOL)
    return True


def _embedding(tp: int, sp: bool):
    state, device = _state(tp), worker_device()
    r, n = state.tp.rank, state.tp.size
    emb = tpl.VocabParallelEmbedding(VOCAB, IN, state.tp, sequence_parallel=sp, device=device, dtype=DT)
    emb.init_weights(_gen(device))
    w_full = torch.empty(VOCAB, IN, dtype=torch.float32, device=device).normal_(0, 0.02, generator=_gen(device)).to(DT)
    ids = torch.randint(0, VOCAB, (S, B), device=device, generator=_gen(device, 3))
    g = torch.randn(S, B, IN, dtype=DT, device=device, generator=_gen(device, 2))
    w_ref = w_full.clone().requires_grad_()
    (F.embedding(ids, w_ref) * g).sum().backward()
    y = emb(ids)
    (y * _seq_slice(g, state, sp)).sum().backward()
    torch.testing.assert_close(y, _seq_slice(F.embedding(ids, w_full), state, sp), **TOL)
    torch.testing.assert_close(emb.weight.grad, w_ref.grad.chunk(n, 0)[r], **TOL)
    return True


def _cross_entropy(tp: int):
    """The fused head + loss against F.linear and F.cross_entropy on the whole vocabulary: loss,
    input gradient and the weight shard's gradient, with chunks that do not divide the tokens,
    padding rows past the real vocabulary, and ignored (weight 0) tokens."""
    state, device = _state(tp), worker_device()
    r, n = state.tp.rank, state.tp.size
    real = VOCAB - 5  # the last 5 rows are padding
    x = torch.randn(S * B, IN, dtype=DT, device=device, generator=_gen(device, 4))
    w_full = torch.randn(VOCAB, IN, dtype=DT, device=device, generator=_gen(device, 7)) * 2
    target = torch.randint(0, real, (S * B,), device=device, generator=_gen(device, 5))
    weights = torch.rand(S * B, dtype=DT, device=device, generator=_gen(device, 6))
    weights[3] = 0.0
    x_ref, w_ref = x.clone().requires_grad_(), w_full.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(x_ref, w_ref)[:, :real], target, reduction="none")
    (ref * weights).sum().backward()
    for chunk in (5, S * B):
        x_mine = x.clone().requires_grad_()
        w_mine = w_full.chunk(n, 0)[r].clone().requires_grad_()
        loss = linear_cross_entropy(x_mine, w_mine, target, weights, state.tp, real, chunk=chunk)
        (3.0 * loss).backward()
        torch.testing.assert_close(loss, (ref * weights).sum().detach(), **TOL)
        # x is the same on every TP rank: each rank's input gradient is its vocabulary shard's part
        grad_x = x_mine.grad.clone()
        dist.all_reduce(grad_x, group=state.tp.process_group)
        torch.testing.assert_close(grad_x, 3.0 * x_ref.grad, **TOL)
        torch.testing.assert_close(w_mine.grad, 3.0 * w_ref.grad.chunk(n, 0)[r], **TOL)
    with torch.no_grad():  # evaluation computes the same loss without preparing gradients
        torch.testing.assert_close(linear_cross_entropy(x, w_full.chunk(n, 0)[r], target, weights, state.tp, real),
                                   (ref * weights).sum().detach(), **TOL)
    return True


def _run_all(tp: int):
    for sp in (False, True):
        for bias in (False, True):
            _column(tp, sp, bias)
            _row(tp, sp, bias)
        _embedding(tp, sp)
    _cross_entropy(tp)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_layers_match_torch(workers, backend, tp):
    world = 4 if backend == "gloo" else tp  # NCCL: one GPU per rank
    assert all(workers(world, backend).run(_run_all, tp))


def test_cross_entropy_single_process_matches_torch():
    state = ParallelState.single()
    x, w = torch.randn(5, 3, dtype=DT), torch.randn(7, 3, dtype=DT) * 4
    target = torch.randint(0, 7, (5,))
    ref = F.cross_entropy(F.linear(x, w), target, reduction="sum")
    got = linear_cross_entropy(x, w, target, torch.ones(5, dtype=DT), state.tp, 7, chunk=2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # bf16 weights and activations: the loss is float32, as the unfused one was
    bf16 = linear_cross_entropy(x.bfloat16(), w.bfloat16(), target, torch.ones(5), state.tp, 7)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), target,
                                                     reduction="sum"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_cross_entropy_kernels_match_the_float32_path():
    """On CUDA with bf16 the loss runs Triton kernels over the bf16 logits. It and the torch path
    (on a float32 copy) against torch's unfused F.linear + F.cross_entropy: the same loss and
    gradients to bf16 accuracy."""
    from megamoe.parallel import cross_entropy

    if cross_entropy.triton is None:
        pytest.skip("needs Triton")
    state = ParallelState.single()
    T, D, V, real = 3000, 512, 20_480, 20_000
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).bfloat16()
    target = torch.randint(0, real, (T,), device="cuda", generator=g)
    weights = (torch.rand(T, device="cuda", generator=g) > 0.1).float()
    results = []
    for fused in (True, False):
        saved = cross_entropy.triton
        cross_entropy.triton = saved if fused else None
        try:
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            loss = cross_entropy.linear_cross_entropy(xi, wi, target, weights, state.tp, real, chunk=1024)
            loss.backward()
            results.append((loss.detach(), xi.grad.float(), wi.grad.float()))
        finally:
            cross_entropy.triton = saved
    # and an independent reference: torch's F.linear in bf16 (the logits' dtype in the model,
    # as before the fusion) and F.cross_entropy on them in float32
    logits = F.linear(x, w).float().requires_grad_()
    ref = (F.cross_entropy(logits[:, :real], target, reduction="none") * weights).sum()
    ref.backward()
    g16 = logits.grad.bfloat16()
    results.append((ref.detach(), (g16 @ w).float(), g16.float().t() @ x.float()))
    # tolerance: the gradients come back in bf16 (one rounding, 2^-8 relative)
    (loss_r, gx_r, gw_r) = results.pop()
    for loss, gx, gw in results:
        torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gx, gx_r, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(gw, gw_r, rtol=1e-2, atol=1e-3)


def _dropout_streams():
    state = ParallelState.build(tp=dist.get_world_size())
    tracker = model_parallel_seed(1234, state, worker_device())
    x = torch.ones(64, 64, device=worker_device())
    replicated = F.dropout(x, 0.5)
    with tracker.fork(TENSOR_PARALLEL_STREAM):
        sharded = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    gathered = [torch.empty_like(x) for _ in range(state.tp.size)]
    dist.all_gather(gathered, replicated.contiguous())
    rep_same = all(torch.equal(gathered[0], t) for t in gathered)
    dist.all_gather(gathered, sharded.contiguous())
    shard_distinct = not torch.equal(gathered[0], gathered[1])
    # forking must not advance the default stream: redo without the fork and compare
    torch.manual_seed(1234 + 100 * state.pp.rank)
    F.dropout(x, 0.5)
    return rep_same, shard_distinct, torch.equal(F.dropout(x, 0.5), after)


def test_rng_streams_identical_on_replicas_distinct_on_shards(workers):
    for rep_same, shard_distinct, default_untouched in workers(2).run(_dropout_streams):
        assert rep_same and shard_distinct and default_untouched
