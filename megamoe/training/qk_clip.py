"""MuonClip's qk-clip (``--qk-clip``) and the attention layers' largest logits
(``--log-max-attention-logit``).

Each attention layer records, during the step's forwards, the largest pre-softmax logit of each
of this rank's heads (:mod:`megamoe.kernels.max_logit`). After the last backward:

1. the per-head maxima are reduced (max) over DP x CP, the ranks holding the same heads for
   other tokens, so every replica clips alike: one all-reduce for all layers of the stage;
2. with ``--qk-clip``, every head whose maximum ``m`` exceeds the threshold ``tau`` gets
   ``gamma = tau / m``, and its weights are scaled so that the same inputs would give ``tau``:

   - MLA (Kimi K2): the head's query nope rows by ``gamma^alpha``, its key nope rows in
     ``wkv_b`` by ``gamma^(1 - alpha)``, its query rope rows by ``gamma``; the rope key is
     shared by all heads and stays;
   - GQA / MHA: a key head serves a group of query heads, so the group takes its largest
     maximum (Megatron-LM's rule): the group's query rows by ``gamma^alpha``, its key rows by
     ``gamma^(1 - alpha)``.

   The scaling is applied to the float32 masters inside the optimizer step, after the update
   and before the parameters are copied or all-gathered from them (``Optimizer.step``'s
   ``edit_masters``), so masters and weights stay equal in every layout;
3. for the log, each layer's maximum over its heads, reduced over TP and PP.

A norm after the projections would undo the scaling, so ``--qk-clip`` is refused for GQA with
``--qk-layernorm`` (MLA's latent norms come before the up-projections and are no obstacle).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe.config import TrainingConfig
from megamoe.kernels.max_logit import MaxLogitTracker
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.numerics import upcast_dtype
from megamoe.parallel import mappings
from megamoe.parallel.state import ParallelState


def attention_layers(model) -> list[tuple[int, nn.Module]]:
    """``(block index, attention module)`` of this rank's blocks: decoder layers, then MTP blocks
    (index ``num_layers + k``)."""
    blocks = [(int(name), block) for name, block in model.layers.items()]
    blocks += [(model.args.num_layers + k, mtp.block) for k, mtp in enumerate(model.mtp)]
    return [(i, block.attn) for i, block in blocks]


def start_tracking(model) -> None:
    """Record the largest logits from now on, until :func:`take_max_logits`."""
    for _, attn in attention_layers(model):
        attn.max_logits = MaxLogitTracker()


def take_max_logits(model, state: ParallelState) -> dict[nn.Module, torch.Tensor]:
    """Each attention layer's per-head maxima since :func:`start_tracking`, over the DP x CP
    ranks holding the same heads (``[local heads]``, float32 or float64; ``-inf`` for no
    logit). Recording stops here."""
    layers = attention_layers(model)
    if not layers:
        return {}
    weight = next(model.parameters())
    rows = []
    for _, attn in layers:
        value = attn.max_logits.take() if attn.max_logits is not None else None
        attn.max_logits = None  # evaluation forwards until the next step's start_tracking skip the pass
        rows.append(value if value is not None else torch.full((attn.num_local_heads,), float("-inf"),
                                                               dtype=upcast_dtype(weight.dtype), device=weight.device))
    stacked = mappings.all_reduce_(torch.stack(rows), state.dp_cp, op=dist.ReduceOp.MAX)
    return {attn: row for (_, attn), row in zip(layers, stacked)}


def layer_max_logits(model, maxima: dict[nn.Module, torch.Tensor], state: ParallelState) -> list[float]:
    """Every block's largest logit over its heads, on every rank (``-inf`` for none)."""
    out = torch.full((model.args.num_blocks,), float("-inf"), device=next(model.parameters()).device)
    for i, attn in attention_layers(model):
        if attn in maxima:
            out[i] = maxima[attn].max()
    mappings.all_reduce_(out, state.tp, op=dist.ReduceOp.MAX)
    mappings.all_reduce_(out, state.pp, op=dist.ReduceOp.MAX)
    return out.tolist()


def _per_head_rows(sizes: list[int], scales: list[torch.Tensor]) -> torch.Tensor:
    """Row factors of a weight whose rows are heads of ``sum(sizes)`` rows in parts: the
    ``sizes[j]`` rows of part ``j`` of head ``h`` get ``scales[j][h]``."""
    heads = len(scales[0])
    return torch.cat([scale[:, None].expand(heads, size) for size, scale in zip(sizes, scales)], dim=1).reshape(-1)


def clip_factors(attn: nn.Module, maxima: torch.Tensor, t: TrainingConfig) -> dict[nn.Parameter, torch.Tensor]:
    """The row factors (one per output row of this rank's shard) of the query and key weights of
    ``attn``, whose heads reached ``maxima`` (see the module docstring)."""
    tau, alpha = t.qk_clip_threshold, t.qk_clip_alpha
    gamma = torch.where(maxima > tau, tau / maxima, torch.ones_like(maxima)).double()
    ones = torch.ones_like(gamma)
    if isinstance(attn, MultiHeadLatentAttention):
        q = attn.wq_b if hasattr(attn, "wq_b") else attn.wq
        return {
            q.weight: _per_head_rows([attn.nope_dim, attn.rope_dim], [gamma ** alpha, gamma]),
            attn.wkv_b.weight: _per_head_rows([attn.nope_dim, attn.v_dim], [gamma ** (1 - alpha), ones]),
        }
    groups = gamma.view(attn.num_local_kv, -1).amin(dim=1)  # each key head: its query heads' smallest gamma
    per_query_head = groups.repeat_interleave(attn.num_local_heads // attn.num_local_kv)
    return {attn.wq.weight: _per_head_rows([attn.head_dim], [per_query_head ** alpha]),
            attn.wk.weight: _per_head_rows([attn.head_dim], [groups ** (1 - alpha)])}


def qk_clip_edit(maxima: dict[nn.Module, torch.Tensor], t: TrainingConfig) -> Optional[Callable[[list], None]]:
    """The masters' edit that clips the heads past ``--qk-clip-threshold`` (for
    ``Optimizer.step``), or None when no head of this rank's layers exceeded it."""
    if not maxima:
        return None
    exceeded = torch.stack([(row > t.qk_clip_threshold).any() for row in maxima.values()]).tolist()  # one sync
    over = [attn for attn, hit in zip(maxima, exceeded) if hit]
    if not over:
        return None
    factors = {p: f for attn in over for p, f in clip_factors(attn, maxima[attn], t).items()}

    @torch.no_grad()
    def edit(master_pieces: list[tuple[nn.Parameter, int, torch.Tensor]]) -> None:
        for param, lo, master in master_pieces:
            rows = factors.get(param)
            if rows is None:
                continue
            flat = master.view(-1)
            row_of = torch.arange(lo, lo + flat.numel(), device=flat.device) // param[0].numel()
            flat.mul_(rows.to(flat.device)[row_of].to(flat.dtype))

    return edit
