"""Collectives smoke tests on gloo: values against hand-computed results, gradients against the
adjoint written out by hand."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel import mappings
from megamoe.parallel.state import ParallelState
from megamoe.testing.distributed import worker_device


def _uneven_all_to_all():
    state = ParallelState.build(ep=dist.get_world_size(), etp=1)
    ep, rank, world = state.ep, dist.get_rank(), dist.get_world_size()
    device = worker_device()
    # Rank r sends (r + j + 1) rows to rank j; row values encode (sender, receiver, row index).
    input_splits = [rank + j + 1 for j in range(world)]
    output_splits = [i + rank + 1 for i in range(world)]
    rows = [torch.tensor([[rank, j, k]], dtype=torch.float64) for j in range(world) for k in range(input_splits[j])]
    x = torch.cat(rows).to(device).requires_grad_()
    y = mappings.all_to_all(x, ep, output_splits, input_splits)
    expected = torch.cat([
        torch.tensor([[i, rank, k]], dtype=torch.float64) for i in range(world) for k in range(output_splits[i])
    ]).to(device)
    assert torch.equal(y, expected)
    # Backward sends each received row's gradient back to its sender: weight row by receiver.
    weight = torch.arange(1, y.shape[0] + 1, dtype=torch.float64, device=device).unsqueeze(1)
    (y * weight * (rank + 1)).sum().backward()
    for j in range(world):  # rows this rank sent to j were received at rank j at offset i=rank
        j_output_splits = [i + j + 1 for i in range(world)]
        start = sum(j_output_splits[:rank])
        for k in range(input_splits[j]):
            row = sum(input_splits[:j]) + k
            assert torch.all(x.grad[row] == (start + k + 1) * (j + 1)), (j, k)
    return True


def test_uneven_all_to_all(workers):
    assert all(workers(4).run(_uneven_all_to_all))


def _gather_scatter_pairs():
    state = ParallelState.build(tp=dist.get_world_size())
    tp, rank, world = state.tp, dist.get_rank(), dist.get_world_size()
    full = torch.arange(world * 6, dtype=torch.float64).reshape(world * 2, 3)
    mine = full.chunk(world, 0)[rank].clone().requires_grad_()
    gathered = mappings.gather_from_sequence_region(mine, tp, dim=0)
    assert torch.equal(gathered, full)
    # backward of the sequence gather is a reduce-scatter: every rank contributes (rank+1)*ones
    (gathered * (rank + 1)).sum().backward()
    assert torch.all(mine.grad == sum(range(1, world + 1)))

    x = full.clone().requires_grad_()
    part = mappings.reduce_scatter_to_sequence_region(x * (rank + 1), tp, dim=0)
    assert torch.equal(part, full.chunk(world, 0)[rank] * sum(range(1, world + 1)))
    part.sum().backward()  # backward all-gathers ones, times this rank's factor
    assert torch.all(x.grad == rank + 1)

    y = full.clone().requires_grad_()
    cols = mappings.gather_from_region(mappings.scatter_to_region(y, tp, dim=0), tp, dim=0)
    assert torch.equal(cols, full)
    cols.sum().backward()
    assert torch.all(y.grad == 1)

    z = torch.ones(2, dtype=torch.float64, requires_grad=True)
    copied = mappings.copy_to_region(z, tp)
    (copied * (rank + 1)).sum().backward()  # identity forward, all-reduce backward
    assert torch.all(z.grad == sum(range(1, world + 1)))
    reduced = mappings.reduce_from_region(torch.full((2,), float(rank), dtype=torch.float64), tp)
    assert torch.all(reduced == sum(range(world)))
    return True


def test_gather_scatter_and_adjoints(workers):
    assert all(workers(4).run(_gather_scatter_pairs))
