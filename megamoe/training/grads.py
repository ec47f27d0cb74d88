"""Global gradient norm and clipping over gradients spread across ranks.

The reductions themselves (over TP for sequence-parallel weights, expert-DP for experts, DP x CP
for dense weights, the ``embd`` group for the pipeline's embedding copies) live in
:mod:`megamoe.parallel.data_parallel`. Losses are normalised by the global token count before
backward, so every reduction is a sum.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.distributed as dist

from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import ParallelState


def global_grad_norm(grads: Iterable[tuple[torch.nn.Parameter, torch.Tensor]], state: ParallelState,
                     dp_sharded: bool = False) -> torch.Tensor:
    """L2 norm of the full model's gradient, each element counted exactly once (a float64
    scalar tensor on the gradients' device); of anything shaped and held like the gradients too
    (the float32 masters: ``Optimizer.params_norm``).

    ``grads``: ``(param, gradient)`` pairs, the gradient being the parameter's whole reduced
    main gradient or, with ``dp_sharded`` (distributed optimizer), the piece of it this rank
    owns. Each rank's squared norms are divided by the number of ranks holding an identical
    copy (:func:`_by_copies`), then summed over the whole world. Per-tensor norms use the
    multi-tensor ``torch._foreach_norm`` kernels, accumulating in float32 (float64 for float64
    gradients), so no float64 copy of a gradient is made.
    """
    groups, device = _by_copies(grads, state, dp_sharded)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for copies, tensors in groups.items():
        # one multi-tensor kernel per group: each gradient's norm in float32 or wider (bf16
        # gradients that are their own main gradients included), squared and summed in float64
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).double()
        total += norms.square().sum() / copies
    return _summed_over_world(total, state).sqrt()


def global_zero_count(grads: Iterable[tuple[torch.nn.Parameter, torch.Tensor]], state: ParallelState,
                      dp_sharded: bool = False) -> int:
    """``--log-num-zeros-in-grad``: how many elements of the full model's gradient are zero,
    each counted once (as :func:`global_grad_norm` counts)."""
    groups, device = _by_copies(grads, state, dp_sharded)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for copies, tensors in groups.items():
        total += sum((t == 0).sum() for t in tensors).double() / copies
    return round(_summed_over_world(total, state).item())


def _by_copies(grads: Iterable[tuple[torch.nn.Parameter, torch.Tensor]], state: ParallelState,
               dp_sharded: bool) -> tuple[dict[int, list[torch.Tensor]], torch.device]:
    """The tensors grouped by how many ranks hold an identical copy of them: DP x CP for dense
    weights and expert-DP for expert weights (unless sharded over them), times TP for
    TP-replicated dense weights. The last stage's copy of the embedding is left out."""
    device = None
    dense_copies = 1 if dp_sharded else state.dp.size * state.cp.size
    expert_copies = 1 if dp_sharded else state.edp.size
    by_copies: dict[int, list[torch.Tensor]] = {}
    for p, g in grads:
        device = g.device
        spec = spec_of(p)
        if spec.shared_embedding and not state.is_first_stage:
            continue
        if spec.is_expert:
            copies = expert_copies * (1 if spec.split_over("etp") else state.etp.size)
        else:
            copies = dense_copies * (1 if spec.split_over("tp") else state.tp.size)
        if g.numel():
            by_copies.setdefault(copies, []).append(g)
    return by_copies, device or _default_device()


def _summed_over_world(total: torch.Tensor, state: ParallelState) -> torch.Tensor:
    if dist.is_initialized() and state.layout.world_size > 1:
        dist.all_reduce(total)
    return total


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
