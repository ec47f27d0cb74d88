"""Pipeline schedules: 1F1B and interleaved 1F1B give the same gradients as the unsplit model
and keep the activations in flight within their bounds.

Two tiers: the real schedules on gloo ranks, and the interleaved schedule on threads whose
point-to-point layer has NCCL's rules (a send completes only when its receive is posted; sends
and receives between two ranks match in posting order). The threaded tier runs many
``pp x vpp x micro-batch`` shapes quickly and turns a deadlock into a timeout."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel.pipeline_parallel import (
    P2P,
    all_forward_all_backward,
    forward_only,
    interleaved_one_forward_one_backward,
    one_forward_one_backward,
    stage_layer_ranges,
    virtual_stage_layer_ranges,
)
from megamoe.parallel.state import ParallelState
from megamoe.testing.distributed import run_on_threads

DT = torch.float64
NUM_MICRO, S, B, D = 6, 3, 2, 5


def _stage_weights(num_stages: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D, dtype=DT, generator=g) / D**0.5 for _ in range(num_stages)]


def _inputs(num_micro: int = NUM_MICRO) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(S, B, D, dtype=DT, generator=g) for _ in range(num_micro)]


def _toy_forward_step(weights: dict[int, torch.Tensor], rank: int, pp: int, vpp: int, num_micro: int,
                      record: list):
    """Virtual stage ``chunk * pp + rank`` is ``tanh(x @ W)``; micro-batch j's loss is weighted by
    j + 1, so a micro-batch fed to the wrong stage or mixed with another changes the gradients."""
    inputs, last = _inputs(num_micro), pp * vpp - 1

    def forward_step(j, x, chunk=0):
        virtual = chunk * pp + rank
        record.append((chunk, j))
        x = inputs[j] if virtual == 0 else x
        y = torch.tanh(x @ weights[virtual])
        if virtual == last:
            return None, (y * y).sum() * (j + 1)
        return y, (weights[virtual] * 0).sum()  # a stage's own loss term (like MoE aux losses)

    return forward_step


def _run(schedule_name: str, vpp: int = 1):
    state = ParallelState.build(pp=dist.get_world_size())
    rank, pp = state.pp.rank, state.pp.size
    all_weights = _stage_weights(pp * vpp)
    weights = {c * pp + rank: all_weights[c * pp + rank].clone().requires_grad_() for c in range(vpp)}
    forward_step = _toy_forward_step(weights, rank, pp, vpp, NUM_MICRO, [])
    p2p = P2P(state.pp, (S, B, D), DT, torch.device("cpu"), ring=vpp > 1)
    if schedule_name == "interleaved":
        stats = interleaved_one_forward_one_backward(forward_step, NUM_MICRO, p2p, vpp)
    else:
        schedule = one_forward_one_backward if schedule_name == "1f1b" else all_forward_all_backward
        stats = schedule(forward_step, NUM_MICRO, p2p)
    return rank, stats.max_in_flight, {v: w.grad for v, w in weights.items()}


def _reference_grads(num_stages: int, num_micro: int = NUM_MICRO) -> list[torch.Tensor]:
    weights = [w.clone().requires_grad_() for w in _stage_weights(num_stages)]
    for j, x in enumerate(_inputs(num_micro)):
        for w in weights:
            x = torch.tanh(x @ w)
        ((x * x).sum() * (j + 1)).backward()
    return [w.grad for w in weights]


@pytest.mark.parametrize("world", [2, 4])
def test_1f1b_matches_all_forward_all_backward_and_bounds_activations(workers, world):
    ref = _reference_grads(world)
    one = workers(world).run(_run, "1f1b")
    afab = workers(world).run(_run, "afab")
    for (stage, peak, grads), (_, afab_peak, afab_grads) in zip(one, afab):
        torch.testing.assert_close(grads[stage], ref[stage], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(afab_grads[stage], ref[stage], rtol=1e-12, atol=1e-14)
        assert peak <= world - stage, (stage, peak)  # 1F1B: at most pp - stage in flight
        assert afab_peak == NUM_MICRO
    assert one[0][1] == world  # the first stage does reach the bound


def test_stage_layer_ranges():
    assert stage_layer_ranges(8, 1) == [(0, 8)]
    assert stage_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_ranges(8, 4, first=1, last=1) == [(0, 1), (1, 4), (4, 7), (7, 8)]
    assert stage_layer_ranges(61, 4, first=13, last=16) == [(0, 13), (13, 29), (29, 45), (45, 61)]
    assert stage_layer_ranges(4, 2, last=3) == [(0, 1), (1, 4)]
    for bad in [dict(num_layers=8, pp=4, first=3), dict(num_layers=4, pp=2, first=3, last=3)]:
        with pytest.raises(ValueError):
            stage_layer_ranges(**bad)


def test_interleaved_on_gloo_matches_the_unsplit_model(workers):
    pp, vpp = 2, 2
    ref = _reference_grads(pp * vpp)
    for rank, peak, grads in workers(pp).run(_run, "interleaved", vpp):
        assert sorted(grads) == [rank, pp + rank]
        for virtual, grad in grads.items():
            torch.testing.assert_close(grad, ref[virtual], rtol=1e-12, atol=1e-14)
        assert peak <= 2 * (pp - rank - 1) + (vpp - 1) * pp + 1


class _RendezvousRing:
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
                        raise TimeoutError(f"rank {rank} waits forever for stage {peer} (deadlock)")
                    data, received = self.channels[(peer, rank)].popleft()
                tensor.copy_(data)
                received.set()
        if not all(event.wait(self.timeout) for event in sent):
            raise TimeoutError(f"rank {rank}: a send is never received (deadlock)")


class _ThreadP2P(P2P):
    def __init__(self, ring: _RendezvousRing, rank: int, pp: int):
        group = type("G", (), {"rank": rank, "size": pp, "ranks": list(range(pp))})()
        super().__init__(group, (S, B, D), DT, torch.device("cpu"), ring=True)
        self.hub = ring

    def _post(self, ops) -> None:
        self.hub.post(self.pp.rank, ops)


def _run_threads(pp: int, vpp: int, num_micro: int, forward_only_run: bool = False):
    hub = _RendezvousRing()
    all_weights = _stage_weights(pp * vpp)

    def rank_main(rank: int):
        weights = {c * pp + rank: all_weights[c * pp + rank].clone().requires_grad_() for c in range(vpp)}
        record: list = []
        step = _toy_forward_step(weights, rank, pp, vpp, num_micro, record)
        p2p = _ThreadP2P(hub, rank, pp)
        if forward_only_run:
            with torch.no_grad():
                forward_only(step, num_micro, p2p, vpp)
            return None, None, record
        stats = interleaved_one_forward_one_backward(step, num_micro, p2p, vpp)
        return stats.max_in_flight, {v: w.grad for v, w in weights.items()}, record

    results = run_on_threads(rank_main, pp)
    assert not any(hub.channels.values()), "messages left unreceived"
    return results


@pytest.mark.parametrize("pp,vpp,num_micro", [
    (pp, vpp, m * pp) for pp in (2, 3, 4) for vpp in (2, 3) for m in (1, 2, 3)
])
def test_interleaved_schedule_matches_the_unsplit_model_under_nccl_rules(pp, vpp, num_micro):
    ref = _reference_grads(pp * vpp, num_micro)
    results = _run_threads(pp, vpp, num_micro)
    for rank, (peak, grads, record) in results.items():
        for virtual, grad in grads.items():
            torch.testing.assert_close(grad, ref[virtual], rtol=1e-12, atol=1e-14)
        # every chunk ran every micro-batch once, and in-flight activations stay within the bound
        assert sorted(record) == [(c, j) for c in range(vpp) for j in range(num_micro)]
        bound = min(2 * (pp - rank - 1) + (vpp - 1) * pp + 1, num_micro * vpp)
        assert peak <= (num_micro * vpp if num_micro == pp else bound), (rank, peak)
    assert results[0][0] == min(2 * (pp - 1) + (vpp - 1) * pp + 1, num_micro * vpp)  # the bound is reached


def test_interleaved_forward_only_visits_every_chunk_and_micro_batch():
    for rank, (_, _, record) in _run_threads(pp=3, vpp=2, num_micro=6, forward_only_run=True).items():
        assert sorted(record) == [(c, j) for c in range(2) for j in range(6)]


def test_interleaved_rejects_micro_batches_not_a_multiple_of_pp():
    with pytest.raises(ValueError, match="not a multiple of the pipeline size 2"):
        _run_threads(pp=2, vpp=2, num_micro=3)


def test_virtual_stage_layer_ranges():
    # 8 layers, pp 2, vpp 2: virtual stages 0..3 take 2 layers each; rank 0 holds 0 and 2
    assert virtual_stage_layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert virtual_stage_layer_ranges(8, 4, 1) == [[r] for r in stage_layer_ranges(8, 4)]
    # uneven ends: rank 0 holds 2 layers (1 per chunk), rank 1 holds 6 (3 per chunk)
    assert virtual_stage_layer_ranges(8, 2, 2, first=2) == [[(0, 1), (4, 5)], [(1, 4), (5, 8)]]
    with pytest.raises(ValueError):
        virtual_stage_layer_ranges(6, 2, 2)
