"""Pipeline schedules (1F1B, interleaved 1F1B, DualPipeV, all-forward-all-backward) give the
gradients of the unsplit model and keep the activations in flight within their bounds.

Three tiers: the action lists' bookkeeping (``check_schedule``, pure logic); every schedule
on threads whose point-to-point layer has NCCL's rules (a send completes only when its receive
is posted; sends and receives between two ranks match in posting order), which runs many
``pp x chunks x micro-batch`` shapes quickly and turns a deadlock into a timeout; and the
schedules on gloo ranks. The toy stages are ``tanh(x W^T)`` through the deferrable linear, so
DualPipeV's deferred weight gradients are exercised too."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel.pipeline_parallel import (
    P2P,
    build_schedule,
    run_schedule,
    stage_layer_ranges,
    v_stage_layer_ranges,
    virtual_stage_layer_ranges,
)
from megamoe.parallel.schedules import (Action, Placement, all_forward_all_backward, check_schedule, dualpipev,
                                        interleaved_1f1b, one_f_one_b, paired_1f1b)
from megamoe.parallel.state import ParallelState
from megamoe.parallel.weight_grad import WeightGradStore, linear
from megamoe.testing.distributed import run_on_threads

DT = torch.float64
NUM_MICRO, S, B, D = 6, 3, 2, 5


def _stage_weights(num_stages: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D, dtype=DT, generator=g) / D**0.5 for _ in range(num_stages)]


def _inputs(num_micro: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(S, B, D, dtype=DT, generator=g) for _ in range(num_micro)]


def _toy_forward_step(weights: dict[int, torch.Tensor], rank: int, placement: Placement, num_micro: int,
                      record: list, store: WeightGradStore):
    """Virtual stage v is ``tanh(x W_v^T)``; micro-batch j's loss is weighted by j + 1, so a
    micro-batch fed to the wrong stage or mixed with another changes the gradients."""
    inputs, last = _inputs(num_micro), placement.num_stages - 1

    def forward_step(j, x, chunk=0):
        stage = placement.stage(rank, chunk)
        record.append((chunk, j))
        x = inputs[j] if stage == 0 else x
        y = torch.tanh(linear(x, weights[stage], None, store))
        if stage == last:
            return None, (y * y).sum() * (j + 1)
        return y, (weights[stage] * 0).sum()  # a stage's own loss term (like MoE aux losses)

    return forward_step


def _reference_grads(num_stages: int, num_micro: int = NUM_MICRO) -> list[torch.Tensor]:
    weights = [w.clone().requires_grad_() for w in _stage_weights(num_stages)]
    for j, x in enumerate(_inputs(num_micro)):
        for w in weights:
            x = torch.tanh(x @ w.t())
        ((x * x).sum() * (j + 1)).backward()
    return [w.grad for w in weights]


def _schedule(name: str, pp: int, rank: int, num_micro: int, chunks: int,
              train: bool = True) -> tuple[Placement, list[Action]]:
    if name == "afab":
        return Placement(pp), all_forward_all_backward(pp, rank, num_micro)
    if name == "paired":  # --overlap-moe-expert-parallel-comm's 1F1B (interleaved with chunks > 1)
        return build_schedule("1f1b", pp, rank, num_micro, chunks, train, paired=True)
    return build_schedule(name, pp, rank, num_micro, chunks if name == "1f1b" else 1, train)


def _run_rank(name: str, rank: int, pp: int, chunks: int, num_micro: int, p2p: P2P, train: bool = True):
    placement, actions = _schedule(name, pp, rank, num_micro, chunks, train)
    all_weights = _stage_weights(placement.num_stages)
    stages = [placement.stage(rank, c) for c in range(placement.chunks)]
    weights = {v: all_weights[v].clone().requires_grad_() for v in stages}
    record: list = []
    store = WeightGradStore()
    step = _toy_forward_step(weights, rank, placement, num_micro, record, store)
    stats = run_schedule(actions, placement, step, p2p, train=train, wgrad_store=store)
    assert len(store) == 0
    return stats.max_in_flight, {v: w.grad for v, w in weights.items()}, record


# ---------------------------------------------------------------------------------------------
# pure logic


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
def test_every_schedule_runs_each_micro_batch_once_with_its_transfers_in_order(pp):
    for rank in range(pp):
        for m in (1, pp, 2 * pp + 1):
            peak = check_schedule(one_f_one_b(pp, rank, m), Placement(pp), rank, m)
            assert peak == min(pp - rank, m)
        for vpp in (2, 3):
            for m in (pp, 2 * pp):
                check_schedule(interleaved_1f1b(pp, rank, m, vpp), Placement(pp, vpp), rank, m)
        for m in (2 * pp, 2 * pp + 1, 3 * pp + 2):
            actions = dualpipev(pp, rank, m)
            # 2 pp + 1 half-stage chunks alive on every rank, for every micro-batch count
            assert check_schedule(actions, Placement(pp, 2, "v"), rank, m) == 2 * pp + 1
            # zero bubble: every deferred backward's weights run, by a W, in this list
            assert sum(a.defer_w for a in actions) == sum(a.kind == "W" for a in actions) > 0


def test_paired_accumulation_keeps_two_micro_batches_alive():
    for m in (1, 2, 5):
        actions = paired_1f1b(1, 0, m)
        assert check_schedule(actions, Placement(1), 0, m) == min(2, m)
        assert _pairs(actions) == [((j, 0), (j - 1, 0)) for j in range(1, m)]


def _pairs(actions: list[Action]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(forward, backward) of each F listed right before another micro-batch's B: what the
    interpreter interleaves piece by piece."""
    return [((a.micro, a.chunk), (b.micro, b.chunk)) for a, b in zip(actions, actions[1:])
            if a.kind == "F" and b.kind == "B" and (a.micro, a.chunk) != (b.micro, b.chunk)]


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_paired_1f1b_pairs_its_steady_state_and_keeps_two_more_in_flight(pp):
    for vpp in (1, 2, 3):
        for m in ((1, pp, 2 * pp + 1) if vpp == 1 else (pp, 2 * pp, 3 * pp)):
            total = m * vpp
            for rank in range(pp):
                actions = paired_1f1b(pp, rank, m, vpp)
                warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp + 1
                peak = check_schedule(actions, Placement(pp, vpp), rank, m)
                assert peak == min(warmup + 1, total) if total > warmup else peak == total, (vpp, m, rank)
                # every forward after the warm-up runs as a pair with a backward
                assert len(_pairs(actions)) == max(total - warmup, 0), (vpp, m, rank)
    with pytest.raises(ValueError, match="not a multiple of the pipeline size 2"):
        paired_1f1b(2, 0, 3, 2)


def test_a_broken_schedule_is_named():
    actions = one_f_one_b(2, 1, 2)
    with pytest.raises(AssertionError, match="before its input is received"):
        check_schedule([a for a in actions if a.kind != "FLUSH"] + [Action("FLUSH")], Placement(2), 1, 2)
    swapped = [Action("B", 0), Action("F", 0)]
    with pytest.raises(AssertionError, match="without its forward"):
        check_schedule(swapped, Placement(1), 0, 1)


def test_dualpipev_needs_two_micro_batches_per_rank():
    with pytest.raises(ValueError, match="at least 2 x pipeline size = 8 micro-batches"):
        dualpipev(4, 0, 7)


# ---------------------------------------------------------------------------------------------
# threads with NCCL's rules


class _RendezvousHub:
    """Point-to-point with NCCL's rules, between threads: FIFO per (sender, receiver) pair; a
    batch returns once its receives have data and its sends have been received."""

    def __init__(self, timeout: float = 20.0):
        self.cond = threading.Condition()
        self.channels: dict[tuple[int, int], deque] = defaultdict(deque)
        self.timeout = timeout

    def post(self, rank: int, ops) -> None:
        sent = []
        with self.cond:
            for kind, tensor, peer in ops:
                if kind == "send":
                    sent.append(threading.Event())
                    self.channels[(rank, peer)].append((tensor.detach().clone(), sent[-1]))
            self.cond.notify_all()
        for kind, tensor, peer in ops:
            if kind == "recv":
                with self.cond:
                    if not self.cond.wait_for(lambda: self.channels[(peer, rank)], self.timeout):
                        raise TimeoutError(f"rank {rank} waits forever for rank {peer} (deadlock)")
                    data, received = self.channels[(peer, rank)].popleft()
                tensor.copy_(data)
                received.set()
        if not all(event.wait(self.timeout) for event in sent):
            raise TimeoutError(f"rank {rank}: a send is never received (deadlock)")


class _ThreadP2P(P2P):
    def __init__(self, hub: _RendezvousHub, rank: int, pp: int):
        group = type("G", (), {"rank": rank, "size": pp, "ranks": list(range(pp))})()
        super().__init__(group, (S, B, D), DT, torch.device("cpu"))
        self.hub = hub

    def post(self, ops) -> None:
        self.hub.post(self.pp.rank, ops)


def _run_threads(name: str, pp: int, chunks: int, num_micro: int, train: bool = True):
    hub = _RendezvousHub()
    results = run_on_threads(lambda rank: _run_rank(name, rank, pp, chunks, num_micro, _ThreadP2P(hub, rank, pp),
                                                    train), pp)
    assert not any(hub.channels.values()), "messages left unreceived"
    return results


def _check_against_reference(results, num_stages: int, num_micro: int) -> None:
    ref = _reference_grads(num_stages, num_micro)
    for rank, (_, grads, record) in results.items():
        for stage, grad in grads.items():
            torch.testing.assert_close(grad, ref[stage], rtol=1e-12, atol=1e-14)


SHAPES = ([("1f1b", pp, 1, m) for pp in (2, 3, 4) for m in (1, pp, 2 * pp + 1)]
          + [("1f1b", pp, vpp, m * pp) for pp in (2, 3, 4) for vpp in (2, 3) for m in (1, 2, 3)]
          + [("dualpipev", pp, 2, m) for pp in (2, 3, 4) for m in (2 * pp, 2 * pp + 1, 3 * pp + 2)]
          + [("paired", pp, 1, m) for pp in (2, 3, 4) for m in (1, pp, 2 * pp + 1)]
          + [("paired", pp, vpp, m * pp) for pp in (2, 4) for vpp in (2, 3) for m in (1, 3)])


@pytest.mark.parametrize("name,pp,chunks,num_micro", SHAPES)
def test_schedule_matches_the_unsplit_model_under_nccl_rules(name, pp, chunks, num_micro):
    placement = _schedule(name, pp, 0, num_micro, chunks)[0]
    results = _run_threads(name, pp, chunks, num_micro)
    _check_against_reference(results, placement.num_stages, num_micro)
    for rank, (peak, _, record) in results.items():
        assert sorted(record) == [(c, j) for c in range(placement.chunks) for j in range(num_micro)]
        if name == "1f1b" and chunks > 1:  # the interleaved bound, reached on rank 0
            bound = min(2 * (pp - rank - 1) + (chunks - 1) * pp + 1, num_micro * chunks)
            assert peak <= (num_micro * chunks if num_micro == pp else bound), (rank, peak)
            assert rank or peak == min(2 * (pp - 1) + (chunks - 1) * pp + 1, num_micro * chunks)


@pytest.mark.parametrize("name,pp,chunks", [("1f1b", 3, 1), ("1f1b", 3, 2), ("dualpipev", 3, 2)])
def test_forward_only_visits_every_chunk_and_micro_batch(name, pp, chunks):
    for _, _, record in _run_threads(name, pp, chunks, 2 * pp, train=False).values():
        assert sorted(record) == [(c, j) for c in range(chunks) for j in range(2 * pp)]


def test_interleaved_rejects_micro_batches_not_a_multiple_of_pp():
    with pytest.raises(ValueError, match="not a multiple of the pipeline size 2"):
        interleaved_1f1b(2, 0, 3, 2)


def test_a_deadlocking_order_fails_on_threads():
    """The thread tier can fail: rank 1 receiving its input only after sending its output is
    the classic deadlock, and turns into a timeout there."""
    hub = _RendezvousHub(timeout=1.0)

    def rank_main(rank: int):
        p2p = _ThreadP2P(hub, rank, 2)
        if rank == 0:
            p2p.post([("recv", p2p.buffer(), 1)])
            p2p.post([("send", torch.zeros(S, B, D, dtype=DT), 1)])
        else:
            p2p.post([("recv", p2p.buffer(), 0)])
            p2p.post([("send", torch.zeros(S, B, D, dtype=DT), 0)])

    with pytest.raises(TimeoutError, match="deadlock"):
        run_on_threads(rank_main, 2)


# ---------------------------------------------------------------------------------------------
# gloo ranks


def _run_gloo(name: str, chunks: int = 1):
    state = ParallelState.build(pp=dist.get_world_size())
    p2p = P2P(state.pp, (S, B, D), DT, torch.device("cpu"))
    return _run_rank(name, state.pp.rank, state.pp.size, chunks, NUM_MICRO, p2p)


@pytest.mark.parametrize("world", [2, 4])
def test_1f1b_matches_all_forward_all_backward_and_bounds_activations(workers, world):
    ref = _reference_grads(world)
    one = workers(world).run(_run_gloo, "1f1b")
    afab = workers(world).run(_run_gloo, "afab")
    for stage, ((peak, grads, _), (afab_peak, afab_grads, _)) in enumerate(zip(one, afab)):
        torch.testing.assert_close(grads[stage], ref[stage], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(afab_grads[stage], ref[stage], rtol=1e-12, atol=1e-14)
        assert peak <= world - stage, (stage, peak)  # 1F1B: at most pp - stage in flight
        assert afab_peak == NUM_MICRO
    assert one[0][0] == world  # the first stage does reach the bound


@pytest.mark.parametrize("name,chunks", [("1f1b", 2), ("dualpipev", 2), ("paired", 1), ("paired", 2)])
def test_interleaved_and_dualpipev_on_gloo_match_the_unsplit_model(workers, name, chunks):
    pp = 2
    ref = _reference_grads(pp * chunks)
    for rank, (_, grads, _) in enumerate(workers(pp).run(_run_gloo, name, chunks)):
        placement = _schedule(name, pp, rank, NUM_MICRO, chunks)[0]
        assert sorted(grads) == sorted(placement.stage(rank, c) for c in range(chunks))
        for stage, grad in grads.items():
            torch.testing.assert_close(grad, ref[stage], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# layer ranges


def test_stage_layer_ranges():
    assert stage_layer_ranges(8, 1) == [(0, 8)]
    assert stage_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_ranges(8, 4, first=1, last=1) == [(0, 1), (1, 4), (4, 7), (7, 8)]
    assert stage_layer_ranges(61, 4, first=13, last=16) == [(0, 13), (13, 29), (29, 45), (45, 61)]
    assert stage_layer_ranges(4, 2, last=3) == [(0, 1), (1, 4)]
    for bad in [dict(num_layers=8, pp=4, first=3), dict(num_layers=4, pp=2, first=3, last=3)]:
        with pytest.raises(ValueError):
            stage_layer_ranges(**bad)


def test_virtual_stage_layer_ranges():
    # 8 layers, pp 2, vpp 2: virtual stages 0..3 take 2 layers each; rank 0 holds 0 and 2
    assert virtual_stage_layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert virtual_stage_layer_ranges(8, 4, 1) == [[r] for r in stage_layer_ranges(8, 4)]
    # uneven ends: rank 0 holds 2 layers (1 per chunk), rank 1 holds 6 (3 per chunk)
    assert virtual_stage_layer_ranges(8, 2, 2, first=2) == [[(0, 1), (4, 5)], [(1, 4), (5, 8)]]
    with pytest.raises(ValueError):
        virtual_stage_layer_ranges(6, 2, 2)


def test_v_stage_layer_ranges():
    # 8 layers, pp 2: virtual stages 0..3; rank 0 holds the first and the last (embedding and head)
    assert v_stage_layer_ranges(8, 2) == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]]
    assert v_stage_layer_ranges(6, 2, first=0, last=0) == [[(0, 0), (6, 6)], [(0, 3), (3, 6)]]


def test_pipeline_layout_strings():
    from megamoe.parallel.pipeline_layout import PipelineLayout, expand

    assert expand("Et*2|(tt|)*2,mL") == "Ett|tt|tt|mL" and expand("((t|)*2L)*1") == "t|t|L"
    # DeepSeek-V3 on PP 8 x VPP 4, as NVIDIA's model zoo places it: 61 layers, the last virtual
    # stage holding only the MTP layer and the head
    zoo = PipelineLayout.parse("Et*2|(tt|)*22t|(tt|)*7mL")
    zoo.check(61, 1, 8)
    ranges = zoo.ranges(8)
    assert zoo.virtual_size(8) == 4 and ranges[0] == [(0, 2), (16, 18), (32, 34), (47, 49)]
    assert ranges[7] == [(14, 16), (30, 32), (46, 47), (61, 61)]
    flat = sorted(r for rank in ranges for r in rank)
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:])) and (flat[0][0], flat[-1][1]) == (0, 61)
    for text, pp, message in [("Ett|ttL", 3, "do not divide over 3"), ("Ett|tL", 2, "3 x 't'"),
                              ("tE|tttL", 2, "virtual stage 0 is 'tE'"), ("Ett|tmtL", 2, "virtual stage 1"),
                              ("Ett|mL|tt|L", 2, "2 x 'L'"), ("Ett|ttLx", 2, "'x' is not a layout symbol"),
                              ("(Ett|ttL", 2, "never closed"), ("Ett|tt)L", 2, "unmatched"), ("Et*|ttL", 2, "count")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            PipelineLayout.parse(text).check(4, 1 if "m" in text else 0, pp)
