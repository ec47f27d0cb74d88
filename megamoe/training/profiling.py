"""``--profile``: a torch.profiler trace of steps ``--profile-step-start`` + 1 .. ``--profile-step-end``
(Megatron-LM's window) on ``--profile-ranks``, and a summary of where the time went, by model
stage and by kernel.

The trace (``rank-R.json.gz`` under ``--profile-dir``, default Megatron's
``<tensorboard-dir>/../torch_profile``) opens in Perfetto or chrome://tracing, and in
TensorBoard's profiler plugin. On CUDA the window is also bracketed by cudaProfilerStart/Stop,
so ``nsys profile --capture-range=cudaProfilerApi`` captures the same steps.

Stages are labelled from outside the model: forward hooks and method wrappers open a
``stage:NAME`` range around each embedding, attention, norm, dense MLP, router, dispatch,
routed experts, combine, shared experts, head + loss, and around the optimizer's gradient
sync, grad norm and step; they are removed when the window closes. The ``--compile``d blocks
are one stage, ``block (compiled)``, labelled where they are called: hooks inside them would be
traced into (and recompile) their graphs; their kernels (Inductor's fused ``triton_*`` ones
among them) are still listed by name. Backward work is attributed through the autograd
sequence numbers that link each backward function to the forward op that recorded it. Each
op's *self* device time (its kernels; self CPU time without a GPU) is added to the innermost
stage, so nothing is counted twice. Kernels the profiler ties to no op are listed as
``unattributed`` (see :func:`stage_times`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from megamoe.config import Config

_STAGE = "stage:"
_BACKWARD = "autograd::engine::evaluate_function: "


def stage_of_module(name: str, module: nn.Module) -> Optional[str]:
    """The stage a module's forward belongs to (None: its parent's)."""
    from megamoe.model.attention import GroupedQueryAttention
    from megamoe.model.experts import GroupedExperts
    from megamoe.model.mla import MultiHeadLatentAttention
    from megamoe.model.mlp import MLP
    from megamoe.model.norm import LayerNorm, RMSNorm
    from megamoe.model.router import TopKRouter
    from megamoe.parallel.tensor_parallel import VocabParallelEmbedding

    if isinstance(module, (GroupedQueryAttention, MultiHeadLatentAttention)):
        return "attention"
    if isinstance(module, TopKRouter):
        return "router"
    if isinstance(module, GroupedExperts):
        return "experts"
    if isinstance(module, MLP):
        return "shared experts" if name.endswith("shared_experts") else "mlp"
    if isinstance(module, (RMSNorm, LayerNorm)) and ".attn." not in name:
        return "norm"  # block and final norms; attention's own norms count as attention
    if isinstance(module, VocabParallelEmbedding):
        return "embedding"
    return None


class StageLabels:
    """Adds the ``stage:`` ranges to a model and an optimizer, and takes them away again."""

    def __init__(self, model: nn.Module, optimizer) -> None:
        self._handles, self._wrapped = [], []
        compiled = []  # ``--compile``d blocks: hooks inside them would be traced into their graphs
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in compiled):
                continue
            if getattr(module, "_compiled_call_impl", None) is not None:
                compiled.append(name)  # its own hooks run inside the compiled call too
                continue
            stage = stage_of_module(name, module)
            if stage is not None:
                self._hook(module, stage)
            if hasattr(module, "dispatcher"):  # a MoE layer: its token exchange stages
                self._wrap(module, "dispatch", "dispatch")
                self._wrap(module, "combine", "combine")
        if compiled:  # label the compiled blocks from their call site, outside the graph
            self._wrap(model, "_run_block", "block (compiled)")
        self._wrap(model, "_token_loss", "head + loss")
        self._wrap(optimizer, "finish_grad_sync", "grad sync")
        self._wrap(optimizer, "start_clip_grad_norm", "grad norm")
        self._wrap(optimizer, "step", "optimizer")

    def _hook(self, module: nn.Module, stage: str) -> None:
        ranges = []

        def enter(*_):
            ranges.append(record_function(_STAGE + stage).__enter__())

        def leave(*_):
            ranges.pop().__exit__(None, None, None)

        self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def _wrap(self, owner, attribute: str, stage: str) -> None:
        original: Callable = getattr(owner, attribute)

        @functools.wraps(original)
        def labelled(*args, **kwargs):
            with record_function(_STAGE + stage):
                return original(*args, **kwargs)

        setattr(owner, attribute, labelled)  # an instance attribute shadows the method
        self._wrapped.append((owner, attribute))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, attribute in self._wrapped:
            delattr(owner, attribute)
        self._handles, self._wrapped = [], []


def _innermost_stage(event) -> Optional[str]:
    while event is not None:
        if event.name.startswith(_STAGE):
            return event.name[len(_STAGE):]
        event = event.cpu_parent
    return None


def _backward_key(event):
    """(forward thread, sequence number) of the forward op a backward event belongs to."""
    while event is not None:
        if event.name.startswith(_BACKWARD) and event.sequence_nr >= 0:
            return event.fwd_thread, event.sequence_nr
        event = event.cpu_parent
    return None


UNATTRIBUTED = "unattributed"  # kernels the profiler tied to no CPU event


def stage_times(events, use_device: bool) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Microseconds per stage, and per (stage, kernel name) with a GPU (per (stage, op) without),
    summed over the profiled window. A kernel reaches a stage through the CPU event that launched
    it; the profiler ties some launches to none (kernels launched straight through the driver, as
    a Triton kernel called outside torch's ops can be), and those count as ``unattributed``, by
    name, so the total is every kernel's time."""
    forward_stage = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(_BACKWARD):
            stage = _innermost_stage(e)
            if stage is not None:
                forward_stage.setdefault((e.thread, e.sequence_nr), stage)
    stages: dict[str, float] = defaultdict(float)
    kernels: dict[tuple[str, str], float] = defaultdict(float)
    on_device: dict[str, float] = defaultdict(float)  # kernel name -> every such kernel's time
    attributed: dict[str, float] = defaultdict(float)  # kernel name -> the time tied to a CPU event
    for e in events:
        if use_device and e.device_type != torch.autograd.DeviceType.CPU:  # a kernel (or copy) itself
            # ... or a labelled region's span as the GPU saw it (record_function's, the stage
            # labels' and the optimizer's step), which holds kernels counted on their own
            if not getattr(e, "is_user_annotation", False):
                on_device[e.name] += e.time_range.end - e.time_range.start
            continue
        if e.name.startswith(_STAGE):
            continue
        stage = _innermost_stage(e)
        if stage is None:
            key = _backward_key(e)
            stage = forward_stage.get(key, "other") if key is not None else "other"
            if key is not None and stage != "other":
                stage += " (bwd)"
        if use_device:
            for kernel in e.kernels:
                stages[stage] += kernel.duration
                kernels[(stage, kernel.name)] += kernel.duration
                attributed[kernel.name] += kernel.duration
        else:
            stages[stage] += e.self_cpu_time_total
            kernels[(stage, e.name)] += e.self_cpu_time_total
    for name, total in on_device.items():
        missing = total - attributed.get(name, 0.0)
        if missing > 1e-6 * total:
            stages[UNATTRIBUTED] += missing
            kernels[(UNATTRIBUTED, name)] += missing
    return dict(stages), dict(kernels)


def format_summary(stages: dict[str, float], kernels: dict[tuple[str, str], float], num_steps: int,
                   device: str, top: int = 15) -> str:
    total = sum(stages.values()) or 1.0
    unit = "device" if device == "cuda" else "CPU"
    lines = [f"profile: {num_steps} steps, {total / 1e3 / num_steps:.1f} ms of {unit} time per step",
             f"{'stage':<24}{'ms/step':>10}{'share':>8}"]
    for stage, us in sorted(stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"{stage:<24}{us / 1e3 / num_steps:>10.2f}{100 * us / total:>7.1f}%")
    lines += ["", f"top {top} {'kernels' if device == 'cuda' else 'ops'} by time",
              f"{'ms/step':>9}{'share':>8}  {'stage':<22}name"]
    for (stage, name), us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{us / 1e3 / num_steps:>9.2f}{100 * us / total:>7.1f}%  {stage:<22}{name[:90]}")
    return "\n".join(lines)


def memory_breakdown(state_bytes: dict[str, int], peak_bytes: int) -> str:
    """The training state's share of the peak (parameters, main gradients, masters, Adam
    states, from the tensors themselves); the rest is activations and temporaries."""
    rows = list(state_bytes.items()) + [("activations + temporaries", peak_bytes - sum(state_bytes.values()))]
    lines = [f"memory at the peak ({peak_bytes / 2**30:.1f} GiB allocated)"]
    lines += [f"  {name:<28}{size / 2**30:>8.2f} GiB" for name, size in rows]
    return "\n".join(lines)


class StepProfiler:
    """Starts the profiler before the window's first step and stops it after its last."""

    def __init__(self, config: Config, rank: int, model: nn.Module, optimizer, device: torch.device, printer):
        log = config.logging
        self.enabled = log.profile and (not log.profile_ranks or rank in log.profile_ranks)
        self.start, self.end, self.rank = log.profile_step_start, log.profile_step_end, rank
        self.model, self.optimizer, self.device, self.print = model, optimizer, device, printer
        self.dir = log.profile_dir or os.path.join(os.path.dirname(os.path.abspath(log.tensorboard_dir or ".")),
                                                    "torch_profile")
        self._profiler = self._labels = None

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.start + 1:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaProfilerStart()
        self._labels = StageLabels(self.model, self.optimizer)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()

    def after_step(self, step: int) -> Optional[str]:
        """The summary, after the window's last step (None otherwise)."""
        if self._profiler is None or step != self.end:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaProfilerStop()
        self._profiler.__exit__(None, None, None)
        self._labels.remove()
        os.makedirs(self.dir, exist_ok=True)
        trace = os.path.join(self.dir, f"rank-{self.rank}.json.gz")
        with contextlib.suppress(OSError):
            self._profiler.export_chrome_trace(trace)
        stages, kernels = stage_times(self._profiler.events(), self.device.type == "cuda")
        summary = format_summary(stages, kernels, self.end - self.start, self.device.type)
        if self.device.type == "cuda":
            summary += "\n\n" + memory_breakdown(self.optimizer.memory_bytes(),
                                                 torch.cuda.max_memory_allocated(self.device))
        with open(os.path.join(self.dir, f"summary-rank-{self.rank}.txt"), "w") as f:
            f.write(summary + "\n")
        self.print(f"> profile of rank {self.rank}: {trace}\n{summary}")
        self._profiler = None
        return summary
