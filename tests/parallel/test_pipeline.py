"""Pipeline schedules on gloo: 1F1B gives the same gradients as all-forward-all-backward and as
the unsplit model, and keeps at most ``pp - stage`` micro-batches' activations alive."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel.pipeline_parallel import (
    P2P,
    all_forward_all_backward,
    one_forward_one_backward,
    stage_layer_ranges,
)
from megamoe.parallel.state import ParallelState

DT = torch.float64
NUM_MICRO, S, B, D = 6, 3, 2, 5


def _stage_weights(num_stages: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D, dtype=DT, generator=g) / D**0.5 for _ in range(num_stages)]


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(S, B, D, dtype=DT, generator=g) for _ in range(NUM_MICRO)]


def _run(schedule_name: str):
    state = ParallelState.build(pp=dist.get_world_size())
    stage, P = state.pp.rank, state.pp.size
    weight = _stage_weights(P)[stage].clone().requires_grad_()
    inputs = _inputs()

    def forward_step(j, x):
        x = inputs[j] if x is None else x
        y = torch.tanh(x @ weight)
        if stage == P - 1:
            return None, (y * y).sum() * (j + 1)
        return y, (weight * 0).sum()  # a stage's own loss term (like MoE aux losses): zero here

    schedule = one_forward_one_backward if schedule_name == "1f1b" else all_forward_all_backward
    stats = schedule(forward_step, NUM_MICRO, P2P(state.pp, (S, B, D), DT, torch.device("cpu")))
    return stage, stats.max_in_flight, weight.grad


def _reference_grads(P: int) -> list[torch.Tensor]:
    weights = [w.clone().requires_grad_() for w in _stage_weights(P)]
    for j, x in enumerate(_inputs()):
        for w in weights:
            x = torch.tanh(x @ w)
        ((x * x).sum() * (j + 1)).backward()
    return [w.grad for w in weights]


@pytest.mark.parametrize("world", [2, 4])
def test_1f1b_matches_all_forward_all_backward_and_bounds_activations(workers, world):
    ref = _reference_grads(world)
    one = workers(world).run(_run, "1f1b")
    afab = workers(world).run(_run, "afab")
    for (stage, peak, grad), (_, afab_peak, afab_grad) in zip(one, afab):
        torch.testing.assert_close(grad, ref[stage], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(afab_grad, ref[stage], rtol=1e-12, atol=1e-14)
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
