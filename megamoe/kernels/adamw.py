"""AdamW over float32 masters in one Triton kernel per parameter group, writing each
parameter's bf16 (or fp16, or float32) copy as it goes.

torch's fused AdamW followed by the copy of the masters into the model's parameters reads the
masters twice (and, given a ``grad_scale``, writes the unscaled gradients back). On the V2-Lite
proxy's 2.25e9 parameters that is the end of every step, at memory bandwidth
(``tools/bench_optimizer.py`` measures both). Here every tensor is cut into chunks of ``CHUNK``
elements, a table on the GPU holds each chunk's addresses (master, gradient, the two moments,
the copy), and one launch per kind of chunk updates all of a group's: per element, read master
+ gradient + moments (16 bytes) and write master + moments + copy (14 bytes for a bf16 copy), once.
Adam's moments may be kept in bf16 (``--exp-avg-dtype`` / ``--exp-avg-sq-dtype``, as DeepSeek-V3
trained): read and widened to float32, updated, used for this step's update unrounded, stored
rounded to nearest (8 bytes of the 30 fewer per element).

The arithmetic is torch's AdamW (``torch.optim.AdamW``, its fused CUDA kernel's order):
decoupled weight decay, the moments, bias corrections from the step count, the gradient divided
by ``grad_scale`` where the clip or the loss scale left one. The step count stays a device
tensor per parameter, as torch keeps it, so checkpoints and ``set_step_count`` see no change.

The copies are written through raw addresses, which autograd's version counters cannot see:
:meth:`TritonAdamW.step` bumps each copy's version, so what keys on a weight's version (the FP8
weight caches, Transformer Engine's first-micro-batch flag) sees the new weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048  # elements per inner iteration of a program
CHUNK = 16 * BLOCK  # elements per program (one table row)
_COPY_CODES = {None: 0, torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
FLOAT32_MOMENTS = (torch.float32, torch.float32)
MOMENT_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel keeps Adam's moments in


def new_adam_state(master: torch.Tensor, step_device, moment_dtypes: tuple = (None, None)) -> dict:
    """Adam's state for ``master`` as torch's AdamW lays it out: a float32 step count on
    ``step_device``, the two moments zero, in ``moment_dtypes`` (None: the master's dtype)."""
    exp_avg, exp_avg_sq = moment_dtypes
    return {"step": torch.zeros((), dtype=torch.float32, device=step_device),
            "exp_avg": torch.zeros_like(master, dtype=exp_avg or master.dtype),
            "exp_avg_sq": torch.zeros_like(master, dtype=exp_avg_sq or master.dtype)}


def triton_adamw_available(masters: list[torch.Tensor]) -> bool:
    """Whether :class:`TritonAdamW` can run over ``masters`` (CUDA float32 tensors, Triton present)."""
    return triton is not None and bool(masters) and all(m.is_cuda and m.dtype == torch.float32 for m in masters)


class TritonAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step runs the Triton kernel of this module. ``copies`` maps a
    master (by identity) to the parameter (bf16, fp16 or float32; contiguous, the master's
    size) the step writes from it; a master not in it, or mapped to None, gets no copy.
    ``moment_dtypes``: the dtypes of ``exp_avg`` and ``exp_avg_sq`` (float32 or bf16). The
    other arguments are AdamW's; ``fused`` is implied (the states and step counts live on the
    GPU, and ``grad_scale`` is honoured as torch's fused step honours it)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 copies: Optional[dict[torch.Tensor, torch.Tensor]] = None,
                 moment_dtypes: tuple[torch.dtype, torch.dtype] = FLOAT32_MOMENTS):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        for dtype in moment_dtypes:
            if dtype not in MOMENT_DTYPES:
                raise ValueError(f"TritonAdamW keeps Adam's moments in float32 or bf16, not {dtype}")
        self.moment_dtypes = tuple(moment_dtypes)
        self.copies = {id(m): c for m, c in (copies or {}).items() if c is not None}
        self._tables: dict[int, tuple[tuple, list]] = {}  # group index -> (addresses key, launches)
        self.grad_scale: Optional[torch.Tensor] = None

    def writes_copy(self, master: torch.Tensor) -> bool:
        return id(master) in self.copies

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "TritonAdamW takes no closure"
        for index, group in enumerate(self.param_groups):
            masters = [m for m in group["params"] if m.grad is not None]
            if not masters:
                continue
            states = [self._state_of(m) for m in masters]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            for launch in self._launches(index, masters, states):
                self._run(launch, group, steps[0])
            written = [self.copies[id(m)] for m in masters if id(m) in self.copies]
            for copy in written:
                torch.autograd.graph.increment_version(copy)

    def _state_of(self, master: torch.Tensor) -> dict:
        state = self.state[master]
        if not state:
            state.update(new_adam_state(master, master.device, self.moment_dtypes))
        return state

    def _launches(self, index: int, masters: list[torch.Tensor], states: list[dict]) -> list:
        """The group's chunk tables, one per kind of chunk (copy dtype, aligned or not); rebuilt
        when a tensor moved."""
        operands = [(m, m.grad, s["exp_avg"], s["exp_avg_sq"], self.copies.get(id(m))) for m, s in zip(masters, states)]
        key = tuple(0 if t is None else t.data_ptr() for row in operands for t in row)
        cached = self._tables.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        for row in operands:
            for t in row:
                if t is not None and not t.is_contiguous():
                    raise ValueError("TritonAdamW needs contiguous masters, gradients, states and copies")
            if row[1].dtype != torch.float32:
                raise ValueError(f"TritonAdamW needs float32 gradients, got {row[1].dtype}")
        # every parameter of a group takes the same step, so one count stands for all
        step_counts = torch.stack([s["step"] for s in states])
        if bool((step_counts != step_counts[0]).any()):
            raise ValueError("TritonAdamW: the parameters of a group have different step counts")
        kinds: dict[tuple, list[list[int]]] = {}  # (copy dtype, aligned) -> table rows
        for row in operands:
            rows = _chunk_rows(row)
            # 16-byte aligned addresses and lengths in multiples of 16 (the usual case) let the
            # kernel load and store 16 bytes at a time
            aligned = all(a % 16 == 0 for r in rows for a in r[:5]) and all(r[5] % 16 == 0 for r in rows)
            if rows:
                kinds.setdefault((None if row[4] is None else row[4].dtype, aligned), []).extend(rows)
        launches = [(torch.tensor(rows, dtype=torch.int64, device=masters[0].device), _COPY_CODES[dtype], aligned)
                    for (dtype, aligned), rows in kinds.items()]
        self._tables[index] = (key, launches)
        return launches

    def _run(self, launch, group: dict, step: torch.Tensor) -> None:
        table, copy_code, aligned = launch
        beta1, beta2 = group["betas"]
        scale = self.grad_scale
        _adamw_chunks[(table.shape[0],)](
            table, step, step if scale is None else scale, float(group["lr"]), float(group["weight_decay"]),
            float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(group["eps"]),
            HAS_SCALE=scale is not None, COPY=copy_code, EXP_AVG=_MOMENT_TYPES[self.moment_dtypes[0]],
            EXP_AVG_SQ=_MOMENT_TYPES[self.moment_dtypes[1]], ALIGNED=aligned, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=8)


def _chunk_rows(operands: tuple) -> list[list[int]]:
    """One table row per ``CHUNK`` elements: each operand's address at the chunk, its length."""
    n = operands[0].numel()
    rows = []
    for start in range(0, n, CHUNK):
        addresses = [0 if t is None else t.data_ptr() + start * t.element_size() for t in operands]
        rows.append(addresses + [min(CHUNK, n - start)])
    return rows


if triton is not None:
    _MOMENT_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

    @triton.jit
    def _address(row, column: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
        # a pointer from the table; one made from an integer carries no alignment the compiler
        # can see, so without the hint every load and store would be a 4-byte (or 2-byte) one
        pointer = tl.load(row + column).to(tl.pointer_type(dtype))
        if ALIGNED:
            pointer = tl.multiple_of(pointer, 16)
        return pointer

    @triton.jit
    def _adamw_chunks(table, step_ptr, scale_ptr, lr, weight_decay, beta1, beta2, log2_beta1, log2_beta2, eps,
                      HAS_SCALE: tl.constexpr, COPY: tl.constexpr, EXP_AVG: tl.constexpr, EXP_AVG_SQ: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # a row of the table: addresses of master, grad, exp_avg, exp_avg_sq, copy (0: none); elements
        row = table + tl.program_id(0).to(tl.int64) * 6
        master = _address(row, 0, tl.float32, ALIGNED)
        grad = _address(row, 1, tl.float32, ALIGNED)
        exp_avg = _address(row, 2, EXP_AVG, ALIGNED)  # the moments' element types (float32 or bf16)
        exp_avg_sq = _address(row, 3, EXP_AVG_SQ, ALIGNED)
        n = tl.load(row + 5).to(tl.int32)
        if ALIGNED:
            n = tl.multiple_of(n, 16)
        step = tl.load(step_ptr)
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        step_size = lr / bias_correction1
        for start in range(0, CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            p = tl.load(master + offs, mask=mask, other=0.0)
            g = tl.load(grad + offs, mask=mask, other=0.0)
            m = tl.load(exp_avg + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(exp_avg_sq + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = g / tl.load(scale_ptr)
            p = p - lr * weight_decay * p
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            p = p - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
            tl.store(master + offs, p, mask=mask)
            tl.store(exp_avg + offs, m.to(EXP_AVG), mask=mask)
            tl.store(exp_avg_sq + offs, v.to(EXP_AVG_SQ), mask=mask)
            if COPY == 1:
                tl.store(_address(row, 4, tl.bfloat16, ALIGNED) + offs, p.to(tl.bfloat16),
                         mask=mask)
            elif COPY == 2:
                tl.store(_address(row, 4, tl.float16, ALIGNED) + offs, p.to(tl.float16),
                         mask=mask)
            elif COPY == 3:
                tl.store(_address(row, 4, tl.float32, ALIGNED) + offs, p, mask=mask)
