"""Gradient finalisation after the last micro-batch: reductions across ranks, global norm, clip.

Every parameter says which group owns its gradient:

- ``param.sequence_parallel``: replicated over TP but fed by this rank's tokens only, so the
  TP ranks hold partial sums: all-reduced over TP first;
- ``param.expert``: routed-expert weights, summed over expert-DP (ranks holding the same slice
  of the same experts);
- everything else: dense weights, summed over DP x CP;
- ``param.pipeline_shared_embedding``: the embedding, of which the last pipeline stage keeps a
  copy (tied head, MTP); the two copies' gradients are then summed over the ``embd`` group.

Losses are normalised by the global token count before backward, so reductions are sums.
Reductions are coalesced: one flat buffer per group and dtype.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megamoe.parallel.state import Group, ParallelState


def main_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The float32 gradient accumulated over micro-batches (see the optimizer)."""
    return param.main_grad


def _all_reduce_coalesced(tensors: list[torch.Tensor], group: Group) -> None:
    if group.size == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group.process_group)
        for t, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(reduced)


def finalize_grads(params: Iterable[torch.nn.Parameter], state: ParallelState) -> None:
    """Reduce every main gradient over the ranks that share its parameter."""
    params = list(params)
    _all_reduce_coalesced([main_grad(p) for p in params if getattr(p, "sequence_parallel", False)], state.tp)
    _all_reduce_coalesced([main_grad(p) for p in params if getattr(p, "expert", False)], state.edp)
    _all_reduce_coalesced([main_grad(p) for p in params if not getattr(p, "expert", False)], state.dp_cp)
    if state.embd is not None:
        _all_reduce_coalesced([main_grad(p) for p in params if getattr(p, "pipeline_shared_embedding", False)],
                              state.embd)


def global_grad_norm(params: Iterable[torch.nn.Parameter], state: ParallelState) -> float:
    """L2 norm of the full model's gradient, each parameter counted exactly once.

    Each rank's squared norms are divided by the number of ranks holding an identical copy
    (DP x CP for dense weights, times TP for TP-replicated ones; expert-DP for expert weights),
    then summed over the whole world. The last stage's copy of the embedding is not counted.
    """
    params = list(params)
    device = main_grad(params[0]).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    dense_copies = state.dp.size * state.cp.size
    for p in params:
        if getattr(p, "pipeline_shared_embedding", False) and not state.is_first_stage:
            continue
        sq = main_grad(p).double().square().sum()
        if getattr(p, "expert", False):
            copies = state.edp.size
        else:
            copies = dense_copies * (1 if hasattr(p, "tensor_parallel_dim") else state.tp.size)
        total += sq / copies
    if dist.is_initialized() and state.layout.world_size > 1:
        dist.all_reduce(total)
    return math.sqrt(total.item())


def clip_grads_(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (0 disables)."""
    if max_norm > 0 and total_norm > max_norm:
        scale = max_norm / (total_norm + 1e-6)
        for p in params:
            main_grad(p).mul_(scale)
