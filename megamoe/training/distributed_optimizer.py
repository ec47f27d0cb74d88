"""The distributed optimizer (``--use-distributed-optimizer``, ZeRO-1): float32 master weights
and Adam states sharded over the data-parallel ranks of each parameter's group.

Parameters and their main gradients live in the contiguous bucketed buffers of
:mod:`megamoe.parallel.data_parallel` (the model's parameters are views of the parameter
buffers). Each bucket is cut into one equal shard per rank of its group (DP x CP for dense
weights, expert-DP for expert weights); this rank owns one shard of every bucket. Per step:

1. gradients are reduce-scattered bucket by bucket (during backward with
   ``--overlap-grad-reduce``), leaving each shard summed on its owner;
2. the grad norm counts every owned element once (TP-replicated weights still divided by TP)
   and clipping scales the owned elements;
3. AdamW updates this rank's masters: one float32 tensor per piece of a parameter inside the
   shard, so weight decay follows the parameter (none for 1-D weights) as without sharding;
4. each bucket's updated shards are all-gathered into the parameter buffer, in place. With
   ``--overlap-param-gather`` the all-gathers are left in flight and a forward pre-hook waits
   for a module's buckets just before it first runs, overlapping the next forward. With
   ``--fp8-param-gather`` the buckets of FP8 weights are quantized from the masters and
   all-gathered in FP8 (``megamoe/training/fp8_param_gather.py``).

AdamW is elementwise, so updating shards gives exactly the update of the whole tensor.
Memory per parameter on each rank: parameter + float32 main gradient as without sharding, and
``12 / DP`` bytes for the float32 master (4) and Adam's two moments (8) instead of 12.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from megamoe.config import ParallelConfig, TrainingConfig
from megamoe.numerics import upcast
from megamoe.kernels.adamw import triton_adamw_runs_on
from megamoe.parallel.data_parallel import Bucket, DataParallelGrads
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import ParallelState
from megamoe.training.fp8_param_gather import fp8_bucket_gathers
from megamoe.training.optimizer import MasterEdit, Optimizer, adamw, tensor_bytes, writes_copies


class Piece:
    """The part ``[lo, hi)`` (bucket offsets) of ``param`` inside this rank's shard of ``bucket``,
    with its float32 master."""

    def __init__(self, param: nn.Parameter, bucket: Bucket, lo: int, hi: int):
        self.param, self.bucket, self.lo, self.hi = param, bucket, lo, hi
        self.master = bucket.param_data[lo:hi].to(dtype=upcast(param).dtype, copy=True)

    @property
    def grad(self) -> torch.Tensor:
        return self.bucket.grad_data[self.lo:self.hi]


class DistributedOptimizer(Optimizer):
    """AdamW over this rank's shards of ``model``'s parameters (see the module docstring)."""

    dp_sharded = True

    def __init__(self, model: nn.Module, t: TrainingConfig, state: ParallelState, parallel: ParallelConfig,
                 fp8_param_gather: bool = False):
        self.state = state
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = DataParallelGrads(self.params, state, overlap=parallel.overlap_grad_reduce, reduce_scatter=True,
                                       bucket_size=parallel.ddp_bucket_size, hold_params=True,
                                       fp8_apart=fp8_param_gather)
        # --fp8-param-gather: the buckets of FP8 weights are gathered in FP8 (fp8_param_gather.py)
        self.fp8_gathers = fp8_bucket_gathers(self.grads.buckets, state) if fp8_param_gather else {}
        self.pieces: dict[Bucket, list[Piece]] = {}
        for bucket in self.grads.buckets:
            first, last = bucket.shard_start, bucket.shard_start + bucket.shard_size
            self.pieces[bucket] = [Piece(p, bucket, max(lo, first), min(hi, last))
                                   for p, lo, hi in bucket.ranges if max(lo, first) < min(hi, last)]
        adam = [piece for pieces in self.pieces.values() for piece in pieces if self._adam_updates(piece.param)]
        # On CUDA the step writes each updated piece straight into this rank's shard of the
        # parameter buffer (TritonAdamW), which the all-gather then sends from in place; the
        # buckets gathered in FP8 are written from their masters by the gather instead.
        copies = [None if x.bucket in self.fp8_gathers else x.bucket.param_data[x.lo:x.hi] for x in adam]
        self.optimizer = adamw([x.master for x in adam], [x.param.ndim >= 2 for x in adam], t, copies=copies)
        self.step_writes_shard = {b: b not in self.fp8_gathers and writes_copies(self.optimizer, [x.master for x in ps])
                                  for b, ps in self.pieces.items()}
        # decided from the parameters, not this rank's shards, so that every rank agrees
        self.skips_on_device = triton_adamw_runs_on(self.params)
        self.overlap_param_gather = parallel.overlap_param_gather
        self._hooks = self._register_gather_hooks(model) if self.overlap_param_gather else []
        self.sync_fp8_params()

    def _adam_updates(self, param: nn.Parameter) -> bool:
        """Whether AdamW updates ``param`` (all of them here; Muon's subclass keeps the matrices)."""
        return True

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(x.param, x.grad) for pieces in self.pieces.values() for x in pieces]

    @torch.no_grad()
    def step(self, lr: float, edit_masters: Optional[MasterEdit] = None) -> None:
        self.finish_param_sync()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for pieces in self.pieces.values():
                for x in pieces:
                    x.master.grad = x.grad
            self._torch_step()
        if edit_masters is not None:
            edit_masters(self.master_pieces())
        for pieces in self.pieces.values():
            for x in pieces:
                x.master.grad = None
        self._start_param_gathers(from_masters=edit_masters is not None)
        if not self.overlap_param_gather:
            self.finish_param_sync()

    def _start_param_gathers(self, only_fp8: bool = False, from_masters: bool = True) -> None:
        """Each bucket's all-gather of the updated shards, in forward order (buckets are in
        backward order), so the first modules' parameters arrive first. ``from_masters``: the
        shards are made from the masters even where the step wrote them (an edit followed it)."""
        for bucket in reversed(self.grads.buckets):
            fp8 = self.fp8_gathers.get(bucket)
            if only_fp8 and fp8 is None:
                continue
            if fp8 is not None:
                gathered = torch.empty(bucket.end - bucket.start, dtype=torch.uint8, device=bucket.grad_data.device)
                bucket.start_param_gather(fp8.quantize_shard(self.pieces[bucket]), gathered, fp8.write_params)
                continue
            if self.step_writes_shard[bucket] and not from_masters:
                bucket.start_param_gather(bucket.shard(bucket.param_data))  # in place
                continue
            send = bucket.shard(bucket.param_data).clone()  # the padding keeps its zeros
            for x in self.pieces[bucket]:
                send[x.lo - bucket.shard_start:x.hi - bucket.shard_start].copy_(x.master)
            bucket.start_param_gather(send)

    def sync_fp8_params(self) -> None:
        """With ``--fp8-param-gather``: the FP8 weights made the FP8 values of their masters
        (at the start, and after a load wrote weights that need not be), as each step leaves
        them."""
        if self.fp8_gathers:
            self._start_param_gathers(only_fp8=True)
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        for bucket in self.grads.buckets:
            bucket.wait_param_gather()

    def state_pieces(self):
        out = []
        for bucket, pieces in self.pieces.items():
            start = {p: lo for p, lo, _ in bucket.ranges}  # each parameter's offset in the bucket
            for x in pieces:
                out.append((x.param, x.lo - start[x.param], self._piece_states(x)))
        return out

    def master_pieces(self) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        return [(param, lo, tensors["master"]) for param, lo, tensors in self.state_pieces()]

    def _piece_states(self, x: Piece) -> dict[str, torch.Tensor]:
        """A piece's tensors in checkpoints: its master and the optimizer's states for it."""
        return {"master": x.master, **self._states(x.master)}

    @torch.no_grad()
    def reset_masters_from_params(self) -> None:
        for bucket, pieces in self.pieces.items():
            for x in pieces:
                x.master.copy_(bucket.param_data[x.lo:x.hi])
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def master_bytes(self) -> int:
        return tensor_bytes(x.master for pieces in self.pieces.values() for x in pieces)

    def _register_gather_hooks(self, model: nn.Module) -> list:
        """Forward pre-hooks that wait for the all-gathers of a module's own parameters."""
        owner = {p: b for b in self.grads.buckets for p in b.params}

        def wait(buckets: list[Bucket], module, args) -> None:
            for b in buckets:
                b.wait_param_gather()

        hooks = []
        for module in model.modules():
            buckets = sorted({owner[p] for p in module.parameters(recurse=False) if p in owner},
                             key=lambda b: b.order)
            if buckets:
                hooks.append(module.register_forward_pre_hook(partial(wait, buckets)))
        # The last pipeline stage's embedding copy can be read by the tied output head without
        # the embedding module running, so the model itself waits for it.
        shared = sorted({b for p, b in owner.items() if spec_of(p).shared_embedding},
                        key=lambda b: b.order)
        if shared:
            hooks.append(model.register_forward_pre_hook(partial(wait, shared)))
        return hooks
