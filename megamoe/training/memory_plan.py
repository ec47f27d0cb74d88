"""The training state each rank holds, predicted without allocating it: weights, float32 main
gradients, float32 masters and the optimizer's states (Adam's moments; Muon's momentum for the
weight matrices with ``--optimizer muon``), per pipeline stage, for any layout.

Each rank's parameters come from the model built on the meta device for that rank (its
shapes, sharding and roles exactly as training builds them), its gradient buffers and buckets
from the same arithmetic the buffers use (``data_parallel.bucket_layout``: padding included),
and its optimizer state from what the optimizer allocates: whole tensors, or with
``--use-distributed-optimizer`` the part of each bucket's shard that holds parameters. The
tests compare the prediction with the allocated tensors (``Optimizer.memory_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.config import Config
from megamoe.model.gpt import GPTModel
from megamoe.numerics import upcast
from megamoe.parallel.data_parallel import ALIGN, bucket_layout, buffer_groups, default_bucket_size
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import Group, ParallelLayout, ParallelState
from megamoe.training.muon import is_matrix
from megamoe.training.optimizer import moment_dtypes
from megamoe.training.train import meta_model

ADAM_STEP_BYTES = 4  # torch's AdamW keeps each tensor's step as a float32 scalar tensor
MUON_STATES = 1  # the momentum buffer, in the masters' dtype


@dataclass(frozen=True)
class StateBytes:
    """One rank's training state in bytes (the keys of ``Optimizer.memory_bytes``), and its
    parameter counts (``num_params``: this rank's; ``num_expert_params``: of them, routed experts)."""

    params: int
    main_grads: int
    masters: int
    adam_states: int
    num_params: int
    num_expert_params: int

    @property
    def total(self) -> int:
        return self.params + self.main_grads + self.masters + self.adam_states

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "main_grads": self.main_grads, "masters": self.masters,
                "adam_states": self.adam_states}


def _shard_overlaps(start: int, end: int, group: Group, ranges) -> list[tuple[int, int]]:
    """``(parameter index, elements)`` of each parameter (not padding) in this rank's shard of
    the bucket [start, end), for the parameters that have some (each gets a master tensor)."""
    size = (end - start) // group.size
    lo, hi = group.rank * size, (group.rank + 1) * size
    return [(i, n) for i, n in ((i, min(b, hi) - max(a, lo)) for i, a, b in ranges) if n > 0]


def master_size(dtype: torch.dtype) -> int:
    """Bytes per element of a float32 (or float64) master and main gradient of a ``dtype`` parameter."""
    return upcast(torch.empty((), dtype=dtype)).element_size()


@dataclass(frozen=True)
class PlannedBuffer:
    """One gradient buffer as ``DataParallelGrads`` lays it out: its parameters, reduction
    groups and buckets (``data_parallel.bucket_layout``: padding included)."""

    name: str
    members: list
    group: Group
    pre_group: Optional[Group]
    layout: list

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def padded(self) -> int:
        return self.layout[-1][1]


def planned_buffers(config: Config, params: list, state: ParallelState) -> list[PlannedBuffer]:
    out = []
    fp8_apart = config.model.fp8_param_gather and config.parallel.use_distributed_optimizer
    for name, members, group, pre_group in buffer_groups(params, state, fp8_apart):
        size = config.parallel.ddp_bucket_size or default_bucket_size(group.size)
        layout = bucket_layout([p.numel() for p in members], size, ALIGN * group.size)
        out.append(PlannedBuffer(name, members, group, pre_group, layout))
    return out


def state_bytes(config: Config, state: ParallelState, model: Optional[GPTModel] = None) -> StateBytes:
    """The training state of the rank ``state`` describes (its groups need no process groups:
    ``ParallelState.without_process_groups``); ``model``: its meta model, when already built."""
    model = model if model is not None else meta_model(config, state)
    params = [p for p in model.parameters() if p.requires_grad]
    distributed = config.parallel.use_distributed_optimizer
    muon = config.training.optimizer == "muon"
    adam_moments = moment_dtypes(config.training)  # exp_avg, exp_avg_sq (None: the masters' dtype)
    weights = grads = masters = moments = 0
    for buf in planned_buffers(config, params, state):
        size = master_size(buf.dtype)
        grads += buf.padded * size
        if distributed:  # parameters live in the padded buffer; masters for this rank's shard
            weights += buf.padded * buf.dtype.itemsize
            pieces = [(buf.members[i], n) for start, end, ranges in buf.layout
                      for i, n in _shard_overlaps(start, end, buf.group, ranges)]
        else:
            weights += sum(p.numel() for p in buf.members) * buf.dtype.itemsize
            pieces = [(p, p.numel()) for p in buf.members]
        masters += sum(n for _, n in pieces) * size
        for p, n in pieces:
            if muon and is_matrix(p):  # Muon's momentum buffer
                moments += MUON_STATES * n * size
            else:  # Adam's two moments, and its step count: a float32 scalar per master tensor
                moments += sum(n * (d.itemsize if d else size) for d in adam_moments) + ADAM_STEP_BYTES
    own_masters = not distributed and all(upcast(p).dtype == p.dtype for p in params)
    return StateBytes(weights, grads, 0 if own_masters else masters, moments, sum(p.numel() for p in params),
                      sum(p.numel() for p in params if spec_of(p).is_expert))


def stage_ranks(layout: ParallelLayout) -> list[int]:
    """One rank per pipeline stage (the one with every other coordinate 0): ranks of a stage
    hold the same amount of state (TP, CP, EP and DP split evenly)."""
    return [g[0] for g in sorted(layout.groups("tp_dp_cp"), key=lambda g: layout.coords(g[0])["pp"])]
