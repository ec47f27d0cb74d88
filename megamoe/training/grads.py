"""Global gradient norm and clipping over gradients spread across ranks.

The reductions themselves (over TP for sequence-parallel weights, expert-DP for experts, DP x CP
for dense weights, the ``embd`` group for the pipeline's embedding copies) live in
:mod:`megamoe.parallel.data_parallel`. Losses are normalised by the global token count before
backward, so every reduction is a sum.
"""

from __future__ import annotations

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
    copy: DP x CP for dense weights and expert-DP for expert weights (unless sharded over
    them), times TP for TP-replicated dense weights; then summed over the whole world. The last
    stage's copy of the embedding is not counted. Per-tensor norms use the multi-tensor
    ``torch._foreach_norm`` kernels in the gradients' dtype, so no float64 copy of a gradient
    is made.
    """
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
    total = torch.zeros((), dtype=torch.float64, device=device or _default_device())
    for copies, tensors in by_copies.items():
        # one multi-tensor kernel per group: each gradient's norm in its own dtype (float32 main
        # gradients), squared and summed in float64
        norms = torch.stack(torch._foreach_norm(tensors)).double()
        total += norms.square().sum() / copies
    if dist.is_initialized() and state.layout.world_size > 1:
        dist.all_reduce(total)
    return total.sqrt()


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
