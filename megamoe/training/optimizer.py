"""AdamW with float32 master weights over bucketed float32 main gradients.

Model parameters keep the training dtype (bfloat16 or float32). Every backward adds the
parameter's gradient into ``param.main_grad`` (float32, a view into a contiguous bucketed buffer
of :mod:`megamoe.parallel.data_parallel`) through a post-accumulate hook and frees
``param.grad``, so micro-batches accumulate in float32 as Megatron does (a step of one backward
pass with nothing to reduce keeps the bf16 gradient itself, which the Triton step reads as it is:
the float32 copy would be exact). The optimizer updates
float32 master copies (the parameters themselves in float32 training) and copies the result
back: on CUDA in the same pass as the update (``megamoe/kernels/adamw.py``). Norm weights,
biases and other 1-D parameters get no weight decay.

Two optimizers share one interface, which is all ``train_step`` uses::

    optimizer.zero_grad(num_micro)      # before the first micro-batch
    ...                                 # forward / backward of each micro-batch
    optimizer.finish_grad_sync()        # every main gradient reduced over its data-parallel group
    norm = optimizer.clip_grad_norm(max_norm)   # or start_clip_grad_norm, read after the step
    optimizer.step(lr)

:class:`MixedPrecisionAdamW` (here) keeps whole masters and Adam states on every rank and
all-reduces gradients; the distributed optimizer (ZeRO-1, ``distributed_optimizer.py``) shards
them over the data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from megamoe.config import ParallelConfig, TrainingConfig
from megamoe.kernels.adamw import TritonAdamW, new_adam_state, triton_adamw_available
from megamoe.numerics import upcast
from megamoe.parallel.data_parallel import DataParallelGrads
from megamoe.parallel.state import ParallelState
from megamoe.training.grads import global_grad_norm, global_zero_count
from megamoe.training.loss_scale import LossScaler
from megamoe.training.moments_adamw import MomentsAdamW
from megamoe.training.to_host import PendingValue


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adamw(masters: list[torch.Tensor], decay: list[bool], t: TrainingConfig,
          copies: Optional[list[torch.Tensor]] = None) -> Optional[torch.optim.AdamW]:
    """AdamW over ``masters``; weight decay where ``decay``. None when there is nothing to
    update (a rank whose shards hold no parameter). On CUDA with Triton, the step is
    :class:`~megamoe.kernels.adamw.TritonAdamW`'s one pass, which also writes ``copies[i]``
    (the parameter ``masters[i]`` stands for, or None; see ``writes_copies``); elsewhere
    torch's AdamW (fused on CUDA), and the caller copies. Moments in bf16 (``--exp-avg-dtype``,
    ``--exp-avg-sq-dtype``) without Triton: :class:`MomentsAdamW`."""
    groups = [{"params": [m for m, d in zip(masters, decay) if d], "weight_decay": t.weight_decay},
              {"params": [m for m, d in zip(masters, decay) if not d], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    hyper = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    moments = moment_dtypes(t)
    if triton_adamw_available(masters):
        return TritonAdamW(groups, **hyper, copies=None if copies is None else dict(zip(masters, copies)),
                           moment_dtypes=tuple(d or torch.float32 for d in moments))
    if moments != (None, None):
        return MomentsAdamW(groups, **hyper, moment_dtypes=moments)
    return torch.optim.AdamW(groups, **hyper, fused=masters[0].is_cuda)


_MOMENT_DTYPE_OF_FLAG = {"fp32": None, "bf16": torch.bfloat16}  # None: the masters' dtype (float64 in tests)


def moment_dtypes(t: TrainingConfig) -> tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """The dtypes of Adam's ``exp_avg`` and ``exp_avg_sq`` (``--exp-avg-dtype``, ``--exp-avg-sq-dtype``)."""
    return _MOMENT_DTYPE_OF_FLAG[t.exp_avg_dtype], _MOMENT_DTYPE_OF_FLAG[t.exp_avg_sq_dtype]


def writes_copies(optimizer: Optional[torch.optim.Optimizer], masters: list[torch.Tensor]) -> bool:
    """Whether ``optimizer``'s step writes the low-precision copy of every one of ``masters``."""
    return isinstance(optimizer, TritonAdamW) and all(optimizer.writes_copy(m) for m in masters)


# Changes the masters after the update, before the parameters are refreshed from them:
# called with Optimizer.master_pieces() (qk-clip, megamoe/training/qk_clip.py).
MasterEdit = Callable[[list[tuple[nn.Parameter, int, torch.Tensor]]], None]


class Optimizer:
    """What the training step needs from an optimizer (see the module docstring).

    Subclasses set ``params``, ``state``, ``grads`` (a :class:`DataParallelGrads`),
    ``dp_sharded`` and ``optimizer`` (the torch optimizer), and implement ``grad_pieces``,
    ``step`` and ``master_bytes``.
    """

    params: list[nn.Parameter]
    state: ParallelState
    grads: DataParallelGrads
    dp_sharded: bool
    optimizer: Optional[torch.optim.Optimizer]

    def zero_grad(self, num_micro: Optional[int] = None) -> None:
        """Zero the main gradients. ``num_micro``: backward passes in this step, which lets
        ``--overlap-grad-reduce`` start a bucket's reduction after its last one (None: reduce
        everything in :meth:`finish_grad_sync`)."""
        for p in self.params:
            p.grad = None
        self.grads.start_step(num_micro)

    def finish_grad_sync(self) -> None:
        """After the last micro-batch: every main gradient summed over the ranks sharing it
        (with the distributed optimizer, this rank's shard of it)."""
        self.grads.finish()

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(param, reduced gradient)`` for the gradients this rank updates."""
        raise NotImplementedError

    _grad_scale: Optional[torch.Tensor] = None  # a division left for the fused step to apply
    _found_inf: Optional[torch.Tensor] = None  # 1.0: the fused step skips itself (a non-finite norm)
    loss_scaler: Optional[LossScaler] = None  # fp16 / --loss-scale (set by build_optimizer)
    # The step decides on the device: the clip's divisor and whether the norm is finite are
    # tensors its kernel reads, so the host may launch it before reading the norm. The same on
    # every rank (a rank without shards to update still takes part in the step's gathers).
    skips_on_device: bool = False

    def clip_grad_norm(self, max_norm: float, loss_scale: float = 1.0) -> float:
        """The global norm of the unscaled gradients; gradients are divided by ``loss_scale``
        (the main gradients hold the scaled loss's) and scaled down to ``max_norm`` (0: no
        clipping) by Megatron-LM's ``max_norm / (norm + 1e-6)`` when that is below 1. A
        non-finite norm (an overflow) is returned with the gradients untouched.

        With a fused AdamW (CUDA) that division is left to the step: its kernel divides each
        gradient by ``grad_scale`` as it reads it (the hook AMP's unscaling uses). Measured on
        the V2-Lite proxy's parameters (``tools/bench_optimizer.py``, one H200): 22.9 ms for
        torch's fused step with ``grad_scale``, against 5.1 + 18.4 ms for a pass over the
        gradients and a plain step. Steps with nothing to divide run torch's plain step, so the
        norm is read on the host first; the Triton step (:attr:`skips_on_device`) reads the
        divisor and the verdict on a non-finite norm (``found_inf``) from the device instead."""
        return self.start_clip_grad_norm(max_norm, loss_scale).read()

    def start_clip_grad_norm(self, max_norm: float, loss_scale: float = 1.0) -> PendingValue:
        """:meth:`clip_grad_norm` whose norm the host may read after launching :meth:`step`
        (where :attr:`skips_on_device`; otherwise it is read here)."""
        pieces = self.grad_pieces()
        norm = global_grad_norm(pieces, self.state, self.dp_sharded) / loss_scale
        self._grad_scale = self._found_inf = None
        if self.skips_on_device:
            if max_norm > 0:
                divisor = torch.where(norm > max_norm, (norm + 1e-6) / max_norm, 1.0) * loss_scale
            else:
                divisor = torch.full_like(norm, loss_scale)
            self._grad_scale = divisor.float()
            self._found_inf = (~torch.isfinite(norm)).float()
            return PendingValue(device_value=norm)
        norm = norm.item()
        clip = max_norm > 0 and norm > max_norm
        if not math.isfinite(norm) or not (clip or loss_scale != 1.0):
            return PendingValue(norm)
        divisor = ((norm + 1e-6) / max_norm if clip else 1.0) * loss_scale
        if self.optimizer is not None and self.optimizer.defaults.get("fused"):
            device = self.optimizer.param_groups[0]["params"][0].device
            # a fill kernel, not a copy from pageable host memory (which the host waits for)
            self._grad_scale = torch.full((), divisor, dtype=torch.float32, device=device)
        else:
            grads = [g for _, g in pieces if g.numel()]
            if grads:  # one multi-tensor kernel; exact for a power-of-two scale without a clip
                torch._foreach_mul_(grads, (max_norm / (norm + 1e-6) if clip else 1.0) / loss_scale)
        return PendingValue(norm)

    def skip_step(self) -> None:
        """An overflowed step: nothing is updated (Adam's step count included); the gradients
        are zeroed by the next :meth:`zero_grad`."""
        self._grad_scale = self._found_inf = None

    def _torch_step(self, narrow_grads: Optional[dict[int, torch.Tensor]] = None) -> None:
        """The torch optimizer's step, with a clip that :meth:`clip_grad_norm` left to it.
        ``narrow_grads``: gradients narrower than their masters, by the master's id (the
        Triton step's ``narrow_grads``; torch takes no bf16 ``.grad`` on a float32 tensor)."""
        self.optimizer.grad_scale, self.optimizer.found_inf = self._grad_scale, self._found_inf
        if narrow_grads:
            self.optimizer.narrow_grads = narrow_grads
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = self.optimizer.found_inf = self._grad_scale = self._found_inf = None
            if narrow_grads:
                self.optimizer.narrow_grads = {}

    def step(self, lr: float, edit_masters: Optional[MasterEdit] = None) -> None:
        """Update the masters at learning rate ``lr``, apply ``edit_masters`` to
        :meth:`master_pieces` (qk-clip), then bring the parameters up to date from the masters."""
        raise NotImplementedError

    def master_pieces(self) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """``(param, lo, master)``: the float32 masters this rank updates, each holding elements
        ``[lo, lo + n)`` of the flattened ``param`` (the parameter itself when it is its own)."""
        return [(p, 0, master) for p, master in zip(self.params, self.masters)]

    @torch.no_grad()
    def grad_zeros(self) -> int:
        """``--log-num-zeros-in-grad``: the zero elements of the whole model's reduced gradient."""
        return global_zero_count(self.grad_pieces(), self.state, self.dp_sharded)

    @torch.no_grad()
    def params_norm(self) -> float:
        """``--log-params-norm``: the L2 norm of the whole model's float32 masters, each element
        counted once whatever the layout (the masters are shaped and owned as the gradients)."""
        pieces = [(p, master) for p, _, master in self.master_pieces()]
        return global_grad_norm(pieces, self.state, self.dp_sharded).item()

    # -- checkpoints (megamoe/training/checkpoint.py)

    def state_pieces(self) -> list[tuple[nn.Parameter, int, dict[str, torch.Tensor]]]:
        """``(param, lo, tensors)``: optimizer tensors holding elements ``[lo, lo + n)`` of the
        flattened ``param``: ``master`` (when not the parameter itself), ``exp_avg``, ``exp_avg_sq``."""
        raise NotImplementedError

    def _states(self, master: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(master, {}) if self.optimizer is not None else {}
        return {k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state}

    def ensure_state(self) -> None:
        """Create Adam's (zero) states before any step, so a checkpoint can be loaded into them."""
        if self.optimizer is None:
            return
        moments = getattr(self.optimizer, "moment_dtypes", (None, None))
        for group in self.optimizer.param_groups:
            fused = group.get("fused") or False
            for m in group["params"]:
                if m not in self.optimizer.state or not self.optimizer.state[m]:
                    self.optimizer.state[m] = new_adam_state(m, m.device if fused else "cpu", moments)

    def step_count(self) -> int:
        """Optimizer steps taken (Adam's bias correction counts them)."""
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return next((int(s["step"]) for s in states if "step" in s), 0)

    def set_step_count(self, steps: int) -> None:
        for s in (self.optimizer.state.values() if self.optimizer is not None else ()):
            if "step" in s:
                s["step"].fill_(steps)

    @torch.no_grad()
    def reset_masters_from_params(self) -> None:
        """A fresh optimizer for the current parameters (``--no-load-optim``, ``--finetune``):
        whole masters copied from the parameters, the torch optimizer's states dropped."""
        for p, master in zip(self.params, self.masters):
            if master is not p:
                master.copy_(p)
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def finish_param_sync(self) -> None:
        """Wait until every parameter holds its updated value (``--overlap-param-gather``
        leaves all-gathers in flight after ``step``)."""

    def sync_fp8_params(self) -> None:
        """Make the parameters what a step leaves them from the masters, where that is not
        the masters' value (``--fp8-param-gather``); called after a checkpoint is loaded."""

    def master_bytes(self) -> int:
        raise NotImplementedError

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank allocates, from the tensors themselves: model parameters, main
        gradients, float32 masters (0 when the parameters are their own), Adam states."""
        states = [v for s in (self.optimizer.state.values() if self.optimizer else ()) for v in s.values()
                  if torch.is_tensor(v)]
        params = self.grads.param_bytes() or tensor_bytes(self.params)
        return {"params": params, "main_grads": self.grads.grad_bytes(), "masters": self.master_bytes(),
                "adam_states": tensor_bytes(states)}


class MixedPrecisionAdamW(Optimizer):
    """AdamW over float32 masters of ``model``'s parameters; gradients all-reduced in buckets
    (``--overlap-grad-reduce``, ``--ddp-bucket-size`` from ``parallel``)."""

    dp_sharded = False

    def __init__(self, model: nn.Module, t: TrainingConfig, state: ParallelState,
                 parallel: Optional[ParallelConfig] = None):
        parallel = parallel or ParallelConfig()
        self.state = state
        self.params = [p for p in model.parameters() if p.requires_grad]
        # float32 (or float64, in tests) parameters are their own masters
        self.masters_are_params = all(upcast(p).dtype == p.dtype for p in self.params)
        self.masters = self.params if self.masters_are_params else [upcast(p.detach()).clone() for p in self.params]
        self.optimizer = adamw(self.masters, [p.ndim >= 2 for p in self.params], t,
                               copies=None if self.masters_are_params else self.params)
        # the Triton step reads bf16 gradients, so a step of one backward pass with nothing to
        # reduce keeps them as they are (no float32 copy: data_parallel.py's module docstring)
        self.grads = DataParallelGrads(self.params, state, overlap=parallel.overlap_grad_reduce,
                                       bucket_size=parallel.ddp_bucket_size,
                                       alias_single_pass=isinstance(self.optimizer, TritonAdamW))
        # the step writes the parameters from the masters itself (TritonAdamW, on CUDA)
        self.step_writes_params = not self.masters_are_params and writes_copies(self.optimizer, self.masters)
        self.skips_on_device = isinstance(self.optimizer, TritonAdamW)

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, p.main_grad) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float, edit_masters: Optional[MasterEdit] = None) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        narrow = {}  # bf16 gradients kept as main gradients (data_parallel.py's alias_single_pass)
        for p, master in zip(self.params, self.masters):
            if p.main_grad.dtype == master.dtype:
                master.grad = p.main_grad
            else:
                narrow[id(master)] = p.main_grad
        self._torch_step(narrow)
        for master in self.masters:
            master.grad = None
        if edit_masters is not None:
            edit_masters(self.master_pieces())
        if not self.masters_are_params and (edit_masters is not None or not self.step_writes_params):
            torch._foreach_copy_(self.params, self.masters)  # one multi-tensor cast-copy

    def master_bytes(self) -> int:
        return 0 if self.masters_are_params else tensor_bytes(self.masters)

    def state_pieces(self):
        out = []
        for p, master in zip(self.params, self.masters):
            tensors = {} if self.masters_are_params else {"master": master}
            out.append((p, 0, {**tensors, **self._states(master)}))
        return out

