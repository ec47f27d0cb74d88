"""Gradient buckets and the distributed optimizer on a toy model: the buffer layout (no process
group), then on 2 gloo ranks: every bucket is reduced exactly once per step, during the last
micro-batch's backward with --overlap-grad-reduce and after backward without it (gloo, and NCCL
where two GPUs are present); a parameter
without a gradient in the last micro-batch (or ever) hangs nothing; reduce-scatter leaves the
summed shard; the overlapped parameter all-gather completes before a module's forward; and
the distributed optimizer's memory per rank. Full-model parity (DP 2 / 4, overlap, ZeRO-1, EP,
PP, TP + SP) is in tests/model/test_model_parallel_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe.config import ParallelConfig, TrainingConfig
from megamoe.parallel import data_parallel
from megamoe.parallel.data_parallel import ALIGN, DataParallelGrads
from megamoe.parallel.param_spec import ParamSpec, set_spec
from megamoe.parallel.state import ParallelState
from megamoe.testing.distributed import fake_state, worker_device
from megamoe.training.distributed_optimizer import DistributedOptimizer
from megamoe.training.optimizer import MixedPrecisionAdamW

DT = torch.float64


class Toy(nn.Module):
    """Four linear layers; ``skip`` leaves layer 2 out of the forward; ``unused`` never runs
    (registered first, so it sits in the last bucket in backward order)."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(3, 3, dtype=DT)
        self.layers = nn.ModuleList(nn.Linear(12, 12, dtype=DT) for _ in range(4))
        self.to(device)

    def forward(self, x, skip: bool = False):
        for i, layer in enumerate(self.layers):
            if not (skip and i == 2):
                x = torch.tanh(layer(x))
        return x.square().sum()


def test_buffer_layout_without_processes():
    model = Toy()
    set_spec(model.layers[1].weight, ParamSpec("expert", (12, 12)))
    set_spec(model.layers[3].weight, ParamSpec("linear", (12, 12), grad_partial_over_tp=True))
    set_spec(model.layers[0].weight, ParamSpec("embedding", (12, 12), shared_embedding=True))
    state = fake_state(8, rank=0, tp=2, pp=2)  # dp 2, embd = first and last stage
    params = list(model.parameters())
    grads = DataParallelGrads(params, state, bucket_size=150)
    names = {buf.name: buf for buf in grads.buffers}
    assert set(names) == {"dense", "expert", "dense_tp", "dense_embd"}
    special = {id(model.layers[i].weight) for i in (0, 1, 3)}
    assert [id(p) for b in names["dense"].buckets for p in b.params] == [id(p) for p in reversed(params)
                                                                       if id(p) not in special]
    for buf in grads.buffers:
        assert buf.group is (state.edp if buf.name == "expert" else state.dp_cp)
        for b in buf.buckets:
            assert (b.end - b.start) % (ALIGN * b.group.size) == 0
            sizes = [hi - lo for _, lo, hi in b.ranges]
            # a bucket closes as soon as it holds bucket_size elements
            assert sum(sizes[:-1]) < 150 and (sum(sizes) >= 150 or b is buf.buckets[-1])
            for p, lo, hi in b.ranges:
                assert p.main_grad.data_ptr() == b.grad_data[lo:].data_ptr() and p.main_grad.shape == p.shape
    # deferred buffers (summed over TP / embd first) come last in the launch order
    assert [b.deferred for b in grads.buckets] == sorted(b.deferred for b in grads.buckets)
    # a world of one: no TP / embd buffers, one bucket with the default size
    single = DataParallelGrads(list(Toy().parameters()), ParallelState.single())
    assert [(buf.name, len(buf.buckets)) for buf in single.buffers] == [("dense", 1)]


def test_each_step_starts_from_zero_gradients():
    """The first gradient of a step is copied in, not added (no zero fill): a parameter that
    gets a gradient in step 1 and none in step 2 must end step 2 at zero, the others at exactly
    step 2's gradients (a fresh model's), and the bucket padding at zero."""
    model, ref = Toy(), Toy()
    grads = DataParallelGrads(list(model.parameters()), ParallelState.single())
    for step, skip in enumerate((False, True)):
        grads.start_step()
        for j in range(2):
            model(_inputs(step, j), skip=skip).backward()
        grads.finish()
    for j in range(2):
        ref(_inputs(1, j), skip=True).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        want = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(p.main_grad, want, rtol=0, atol=0, msg=name)
    assert model.layers[2].weight.main_grad.abs().sum() == 0
    for b in grads.buckets:
        covered = torch.zeros(b.end - b.start, dtype=torch.bool)
        for _, lo, hi in b.ranges:
            covered[lo:hi] = True
        assert b.grad_data[~covered].abs().sum() == 0


def test_a_single_pass_step_keeps_bf16_gradients_as_main_gradients():
    """With ``alias_single_pass``, a step of one backward pass leaves each parameter's bf16
    gradient itself as its main gradient (no float32 copy), equal to a separate model's; a
    parameter without a gradient gets its zeroed float32 view. A step of two passes accumulates
    in float32 as ever, also when a step announced as one gets a second pass (the first is
    widened into the buffer first): exactly the float32 sum of the two bf16 gradients."""
    model, ref = Toy().bfloat16(), Toy().bfloat16()
    grads = DataParallelGrads(list(model.parameters()), ParallelState.single(), alias_single_pass=True)
    views = {p: p.main_grad for p in model.parameters()}
    bf16 = [_inputs(0, j).bfloat16() for j in range(2)]

    def reference(passes, skip=False):
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in ref.parameters()]
        for x in passes:
            ref.zero_grad()
            ref(x, skip=skip).backward()
            for s, q in zip(sums, ref.parameters()):
                if q.grad is not None:
                    s += q.grad.float()
        return sums

    for announced, passes, skip in ((1, bf16[:1], True), (2, bf16, False), (1, bf16, False), (1, bf16[1:], False)):
        grads.start_step(announced)
        for x in passes:
            model(x, skip=skip).backward()
        grads.finish()
        aliased = announced == 1 and len(passes) == 1
        for (name, p), want in zip(model.named_parameters(), reference(passes, skip)):
            has_grad = name != "unused.weight" and name != "unused.bias" and not (skip and ".2." in name)
            if aliased and has_grad:
                assert p.main_grad.dtype == torch.bfloat16 and p.main_grad.data_ptr() != views[p].data_ptr(), name
            else:
                assert p.main_grad is views[p], name
            assert p.grad is None
            torch.testing.assert_close(p.main_grad.float(), want, rtol=0, atol=0, msg=name)


def _inputs(rank: int, j: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(5, 12, dtype=DT, generator=torch.Generator().manual_seed(100 * rank + j)).to(device)


def _reference_grads(state: ParallelState, num_micro: int, skip_last: bool, device) -> list[torch.Tensor]:
    ref = Toy(device)
    for j in range(num_micro):
        ref(_inputs(state.rank, j, device), skip=skip_last and j == num_micro - 1).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in ref.parameters()]
    for g in grads:
        dist.all_reduce(g)
    return grads


def _bucket_reduction(overlap: bool, reduce_scatter: bool, skip_last: bool):
    """Two steps of three micro-batches; records which phase every collective ran in."""
    state, device = ParallelState.build(), worker_device()
    model = Toy(device)
    grads = DataParallelGrads(list(model.parameters()), state, overlap=overlap, reduce_scatter=reduce_scatter,
                              bucket_size=150)
    phase, calls = ["start"], []
    saved = dist.all_reduce, data_parallel._reduce_scatter_single

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls.append(phase[0])
            return fn(*args, **kwargs)
        return wrapped

    dist.all_reduce, data_parallel._reduce_scatter_single = counting(saved[0]), counting(saved[1])
    try:
        for _ in range(2):
            calls.clear()
            grads.start_step(3)
            for j in range(3):
                phase[0] = f"micro{j}"
                model(_inputs(state.rank, j, device), skip=skip_last and j == 2).backward()
            phase[0] = "finish"
            grads.finish()
    finally:
        dist.all_reduce, data_parallel._reduce_scatter_single = saved
    in_backward = [b.launched_in_backward for b in grads.buckets]
    launches = [b.num_launches for b in grads.buckets]
    no_last_grad = set(model.unused.parameters()) | (set(model.layers[2].parameters()) if skip_last else set())
    incomplete = [any(p in no_last_grad for p in b.params) for b in grads.buckets]
    want = _reference_grads(state, 3, skip_last, device)
    for p, g in zip(model.parameters(), want):
        b, lo, hi = next((b, lo, hi) for b in grads.buckets for q, lo, hi in b.ranges if q is p)
        got, expect = b.grad_data[lo:hi], g.flatten()
        if reduce_scatter:  # only this rank's shard is summed
            s0, s1 = max(lo, b.shard_start), min(hi, b.shard_start + b.shard_size)
            got, expect = b.grad_data[s0:s1], expect[s0 - lo:s1 - lo] if s0 < s1 else expect[:0]
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    return calls, in_backward, launches, len(grads.buckets), incomplete


@pytest.mark.parametrize("reduce_scatter", [False, True], ids=["all-reduce", "reduce-scatter"])
@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlap"])
def test_each_bucket_is_reduced_once_per_step(workers, backend, overlap, reduce_scatter):
    results = workers(2, backend).run(_bucket_reduction, overlap, reduce_scatter, False)
    for calls, in_backward, launches, num_buckets, _ in results:
        assert num_buckets >= 4
        assert launches == [2] * num_buckets  # two steps, once each
        assert len(calls) == num_buckets  # the second step's collectives
        if overlap:
            # nothing before the last micro-batch's backward; all of it during that backward
            # except the last bucket, whose `unused` weight never gets a gradient: at finish
            assert calls == ["micro2"] * (num_buckets - 1) + ["finish"]
            assert in_backward == [True] * (num_buckets - 1) + [False]
        else:
            assert calls == ["finish"] * num_buckets and not any(in_backward)


def test_a_parameter_without_a_last_gradient_hangs_nothing(workers, backend):
    # layer 2 skips the last micro-batch; `unused` never gets a gradient
    for calls, in_backward, launches, num_buckets, incomplete in workers(2, backend).run(_bucket_reduction, True,
                                                                                          True, True):
        assert launches == [2] * num_buckets and len(calls) == num_buckets
        # Buckets start in one order on every rank. In the first step those behind layer 2 in
        # reverse registration order (layers 1, 0, unused) wait for finish too; that step's
        # observed order puts layer 2's and unused's last, so in the second step (checked
        # here) every bucket whose gradients are complete starts during backward.
        assert 0 < in_backward.count(True) < num_buckets
        assert in_backward == [not i for i in incomplete]
        assert calls == ["micro2"] * in_backward.count(True) + ["finish"] * in_backward.count(False)


def _communicators_do_not_wait_for_each_other():
    """4 ranks, EP 2: layer 1 is an expert layer (reduced over expert-DP, 2 ranks), the rest dense
    (DP, 4 ranks). Layer 2 skips the last micro-batch, so its dense bucket and the dense ones
    behind it wait for finish; layer 1's expert buckets, behind layer 2 in backward order but on
    another communicator, start during backward. The sums are each group's."""
    state, device = ParallelState.build(ep=2), worker_device()
    model = Toy(device)
    for p in model.layers[1].parameters():
        set_spec(p, ParamSpec("expert", tuple(p.shape)))
    grads = DataParallelGrads(list(model.parameters()), state, overlap=True, bucket_size=150)
    grads.start_step(2)
    for j in range(2):
        model(_inputs(state.rank, j, device), skip=j == 1).backward()
    expert_buckets = [b for b in grads.buckets if b.group is state.edp]
    launched = [b.launched_in_backward for b in expert_buckets]
    grads.finish()
    ref = Toy(device)
    for j in range(2):
        ref(_inputs(state.rank, j, device), skip=j == 1).backward()
    experts = {id(p) for p in model.layers[1].parameters()}
    for p, q in zip(model.parameters(), ref.parameters()):
        want = torch.zeros_like(q) if q.grad is None else q.grad.clone()
        dist.all_reduce(want, group=(state.edp if id(p) in experts else state.dp).process_group)
        torch.testing.assert_close(p.main_grad, want, rtol=1e-12, atol=1e-12)
    return launched, [b.launched_in_backward for b in grads.buckets if b.group is not state.edp]


def test_expert_buckets_do_not_wait_for_dense_ones(workers):
    for expert, dense in workers(4).run(_communicators_do_not_wait_for_each_other):
        assert expert and all(expert)  # all during backward
        assert not all(dense) and any(dense)  # layer 3's during backward, layer 2's and after at finish


class Shuffled(nn.Module):
    """Four linear layers registered 0, 1, 2, 3 but run 0, 2, 3, 1: backward finishes layer 1
    first, then 3, 2, 0, where reverse registration guesses 3, 2, 1, 0. ``skip`` leaves
    layer 2 out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(12, 12, dtype=DT) for _ in range(4))

    def forward(self, x, skip: bool = False):
        for i in (0, 2, 3, 1):
            if not (skip and i == 2):
                x = torch.tanh(self.layers[i](x))
        return x.square().sum()


def _buckets_follow_the_observed_backward_order():
    """Three steps of two micro-batches, one bucket per layer. Logs each layer's last gradient
    and each bucket's launch; rank 1 skips layer 2 in its last micro-batch of the first step,
    so the ranks observe different orders then."""
    state = ParallelState.build()
    model = Shuffled()
    grads = DataParallelGrads(list(model.parameters()), state, overlap=True, bucket_size=150)
    layer_of = {p: i for i, layer in enumerate(model.layers) for p in layer.parameters()}
    bucket_layer = {b: layer_of[b.params[0]] for b in grads.buckets}
    assert all(len({layer_of[p] for p in b.params}) == 1 for b in grads.buckets)
    log, orders = [], []
    for b in grads.buckets:
        start = b.start_grad_reduce
        b.start_grad_reduce = lambda rs, b=b, start=start: (log.append(("launch", bucket_layer[b])), start(rs))
    for layer in model.layers:
        layer.weight.register_post_accumulate_grad_hook(lambda p: log.append(("grad", layer_of[p])))
    ref = Shuffled()
    for step in range(3):
        log.clear()
        grads.start_step(2)
        for j in range(2):
            skip = step == 0 and j == 1 and state.rank == 1
            x = _inputs(state.rank, 10 * step + j)
            model(x, skip=skip).backward()
            ref(x, skip=skip).backward()
        grads.finish()
        orders.append([[bucket_layer[b] for b in queue] for queue in grads.launch_orders()])
        for p, q in zip(model.parameters(), ref.parameters()):
            want = q.grad.clone()
            dist.all_reduce(want)
            torch.testing.assert_close(p.main_grad, want, rtol=1e-12, atol=1e-12)
            q.grad = None
    return orders, list(log)  # the last step's log


def test_buckets_follow_the_observed_backward_order(workers):
    results = workers(2).run(_buckets_follow_the_observed_backward_order)
    (orders, log), (orders_1, _) = results
    # the first step's observations (rank 0: 1 3 2 0; rank 1: 1 3 0, layer 2 at finish) agreed
    # on by both ranks: each bucket's earliest position (layers 2 and 0 tie at 2: current order)
    assert orders == orders_1 == [[[1, 3, 2, 0]]] * 3
    # from the second step on each bucket starts as soon as its layer's last gradient is in,
    # before the next layer's (the last micro-batch's events: each layer's weight gradient and
    # its bucket's launch, side by side)
    grads_seen = [i for i, (kind, _) in enumerate(log) if kind == "grad"]
    last_micro = log[grads_seen[3] + 1:]
    assert [set(last_micro[i:i + 2]) for i in range(0, 8, 2)] == [{("grad", n), ("launch", n)} for n in (1, 3, 2, 0)]


def _optimizer_memory_and_gather(dp_shard: bool):
    state = ParallelState.build()
    model = Toy()
    t = TrainingConfig()
    p = ParallelConfig(use_distributed_optimizer=dp_shard, overlap_param_gather=dp_shard, ddp_bucket_size=150)
    opt = (DistributedOptimizer if dp_shard else MixedPrecisionAdamW)(model, t, state, p)
    opt.zero_grad(1)
    model(_inputs(state.rank, 0)).backward()
    opt.finish_grad_sync()
    opt.step(1e-2)
    in_flight = sum(b._param_work is not None for b in opt.grads.buckets)
    model.layers[0](_inputs(0, 0))  # the pre-hook waits for layer 0's buckets only
    waited = [b for b in opt.grads.buckets if any(q is model.layers[0].weight for q in b.params)]
    assert all(b._param_work is None for b in waited)
    opt.finish_param_sync()
    # every rank holds the same updated weights
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(state.dp.size)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], x) for x in everyone)
    return in_flight, opt.memory_bytes(), sum(q.numel() for q in model.parameters())


def test_distributed_optimizer_memory_and_lazy_gather(workers):
    plain = workers(2).run(_optimizer_memory_and_gather, False)
    sharded = workers(2).run(_optimizer_memory_and_gather, True)
    n = plain[0][2]
    assert plain[0][0] == 0 and sharded[0][0] > 0  # the all-gathers were left in flight after step()
    for _, mem, _ in plain:  # float64 parameters are their own masters; Adam: two moments
        assert mem["masters"] == 0 and 16 * n <= mem["adam_states"] <= 16 * n + 8 * 64
        assert mem["main_grads"] >= 8 * n
    # sharded: every element's master and moments on exactly one rank, about half on each
    assert sum(mem["masters"] for _, mem, _ in sharded) == 8 * n
    for _, mem, _ in sharded:
        assert abs(mem["masters"] - 4 * n) <= 8 * ALIGN * 2 * 3
        assert 2 * mem["masters"] <= mem["adam_states"] <= 2 * mem["masters"] + 8 * 64
        assert mem["main_grads"] == mem["params"]  # float64 parameter and gradient buffers, same layout
