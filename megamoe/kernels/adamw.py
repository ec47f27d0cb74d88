"""AdamW over float32 masters in one Triton kernel per parameter group, writing each
parameter's bf16 (or fp16, or float32) copy as it goes.

torch's fused AdamW followed by the copy of the masters into the model's parameters reads the
masters twice (and, given a ``grad_scale``, writes the unscaled gradients back). On the V2-Lite
proxy's 2.25e9 parameters that is the end of every step, at memory bandwidth
(``tools/bench_optimizer.py`` measures both). Here every tensor is cut into chunks of ``CHUNK``
elements, a table on the GPU holds each chunk's addresses (master, gradient, the two moments,
the copy), and one launch per kind of chunk updates all of a group's: per element, read master
+ gradient + moments (16 bytes) and write master + moments + copy (14 bytes for a bf16 copy), once.
The gradients may be float32, bf16 or fp16 (a step's bf16 gradient read as it is, where the
float32 main gradient would only be its exact copy: ``megamoe/parallel/data_parallel.py``), and
they are new tensors from step to step: the table holds each gradient's parameter index and
offset, and a small tensor of the gradients' addresses, uploaded when they move, completes them.
Adam's moments may be kept in bf16 (``--exp-avg-dtype`` / ``--exp-avg-sq-dtype``, as DeepSeek-V3
trained): read and widened to float32, updated, used for this step's update unrounded, stored
rounded to nearest (8 bytes of the 30 fewer per element).

The arithmetic is torch's AdamW (``torch.optim.AdamW``, its fused CUDA kernel's order):
decoupled weight decay, the moments, bias corrections from the step count, the gradient divided
by ``grad_scale`` where the clip or the loss scale left one. A ``found_inf`` of 1 (the grad norm
was not finite) makes the step change nothing, its step counts included, as torch's fused step
does: the host need not read the norm before launching it. The step count stays a device
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
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what it reads gradients in


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


def triton_adamw_runs_on(params: list[torch.Tensor]) -> bool:
    """Whether the float32 masters of ``params`` (bf16, fp16 or float32 model parameters) get
    :class:`TritonAdamW`: the same answer on every rank, whichever shards a rank holds."""
    return triton is not None and bool(params) and all(
        p.is_cuda and torch.promote_types(p.dtype, torch.float32) == torch.float32 for p in params)


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
        # group index -> (addresses key, launches, the gradients' base addresses on the device, and
        # the list last uploaded into it)
        self._tables: dict[int, tuple[tuple, list, torch.Tensor, list]] = {}
        self.grad_scale: Optional[torch.Tensor] = None
        self.found_inf: Optional[torch.Tensor] = None  # a float32 scalar; 1: skip the step
        # gradients narrower than their masters (bf16 or fp16, by the master's id), which torch
        # will not take as a float32 tensor's ``.grad``; the caller sets and clears them around a step
        self.narrow_grads: dict[int, torch.Tensor] = {}

    def writes_copy(self, master: torch.Tensor) -> bool:
        return id(master) in self.copies

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "TritonAdamW takes no closure"
        for index, group in enumerate(self.param_groups):
            grads = [self.narrow_grads.get(id(m), m.grad) for m in group["params"]]
            masters = [m for m, g in zip(group["params"], grads) if g is not None]
            grads = [g for g in grads if g is not None]
            if not masters:
                continue
            states = [self._state_of(m) for m in masters]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            if self.found_inf is not None:
                torch._foreach_sub_(steps, [self.found_inf] * len(steps))
            launches, bases = self._launches(index, masters, grads, states)
            for launch in launches:
                self._run(launch, bases, group, steps[0])
            written = [self.copies[id(m)] for m in masters if id(m) in self.copies]
            for copy in written:
                torch.autograd.graph.increment_version(copy)

    def _state_of(self, master: torch.Tensor) -> dict:
        state = self.state[master]
        if not state:
            state.update(new_adam_state(master, master.device, self.moment_dtypes))
        return state

    def _launches(self, index: int, masters: list[torch.Tensor], grads: list[torch.Tensor],
                  states: list[dict]) -> tuple[list, torch.Tensor]:
        """The group's chunk tables, one per kind of chunk (copy and gradient dtypes, aligned or
        not), rebuilt when a master, moment or copy moved; and the gradients' addresses, uploaded
        when a gradient moved (every step, where they are the step's own bf16 gradients)."""
        operands = [(m, s["exp_avg"], s["exp_avg_sq"], self.copies.get(id(m))) for m, s in zip(masters, states)]
        for m, g in zip(masters, grads):  # checked every step: the gradients may be new tensors
            if g.dtype not in _GRAD_DTYPES or g.shape != m.shape or not g.is_contiguous():
                raise ValueError(f"TritonAdamW reads contiguous float32, bf16 or fp16 gradients of the master's "
                                 f"shape, got {g.dtype} {tuple(g.shape)} (stride {g.stride()}) for {tuple(m.shape)}")
        key = (tuple(0 if t is None else t.data_ptr() for row in operands for t in row)
               + tuple((g.dtype, g.data_ptr() % 16 == 0) for g in grads))
        cached = self._tables.get(index)
        if cached is None or cached[0] != key:
            cached = self._tables[index] = (key, *self._build(masters, states, operands, grads), [])
        _, launches, bases, uploaded = cached
        addresses = [g.data_ptr() for g in grads]
        if addresses != uploaded:
            host = torch.tensor(addresses, dtype=torch.int64)
            if bases.is_cuda:  # pinned, so the copy queues behind the GPU's work instead of waiting for it
                host = host.pin_memory()
            bases.copy_(host, non_blocking=True)
            uploaded[:] = addresses
        return launches, bases

    def _build(self, masters, states, operands, grads) -> tuple[list, torch.Tensor]:
        for row in operands:
            for t in row:
                if t is not None and not t.is_contiguous():
                    raise ValueError("TritonAdamW needs contiguous masters, states and copies")
        # every parameter of a group takes the same step, so one count stands for all
        step_counts = torch.stack([s["step"] for s in states])
        if bool((step_counts != step_counts[0]).any()):
            raise ValueError("TritonAdamW: the parameters of a group have different step counts")
        kinds: dict[tuple, list[list[int]]] = {}  # (copy dtype, gradient dtype, aligned) -> table rows
        for i, (row, g) in enumerate(zip(operands, grads)):
            rows = _chunk_rows(row, i, g.element_size())
            # 16-byte aligned addresses and lengths in multiples of 16 (the usual case) let the
            # kernel load and store 16 bytes at a time
            aligned = (g.data_ptr() % 16 == 0 and all(a % 16 == 0 for r in rows for a in (r[0], *r[2:6]))
                       and all(r[6] % 16 == 0 for r in rows))
            if rows:
                copy = row[3]
                kinds.setdefault((None if copy is None else copy.dtype, g.dtype, aligned), []).extend(rows)
        device = masters[0].device
        launches = [(torch.tensor(rows, dtype=torch.int64, device=device), _COPY_CODES[copy], grad, aligned)
                    for (copy, grad, aligned), rows in kinds.items()]
        return launches, torch.zeros(len(masters), dtype=torch.int64, device=device)

    def _run(self, launch, bases: torch.Tensor, group: dict, step: torch.Tensor) -> None:
        table, copy_code, grad_dtype, aligned = launch
        beta1, beta2 = group["betas"]
        scale, found_inf = self.grad_scale, self.found_inf
        _adamw_chunks[(table.shape[0],)](
            table, bases, step, step if scale is None else scale, step if found_inf is None else found_inf,
            float(group["lr"]), float(group["weight_decay"]),
            float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(group["eps"]),
            HAS_SCALE=scale is not None, HAS_FOUND_INF=found_inf is not None, COPY=copy_code, GRAD=_GRAD_TYPES_OF[grad_dtype], EXP_AVG=_MOMENT_TYPES[self.moment_dtypes[0]],
            EXP_AVG_SQ=_MOMENT_TYPES[self.moment_dtypes[1]], ALIGNED=aligned, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=8)


def _chunk_rows(operands: tuple, grad_index: int, grad_size: int) -> list[list[int]]:
    """One table row per ``CHUNK`` elements: master's address at the chunk, the gradient's
    index (into the addresses uploaded each step) and byte offset, the moments' and the copy's
    addresses (0: none), its length."""
    n = operands[0].numel()
    rows = []
    for start in range(0, n, CHUNK):
        master, *rest = [0 if t is None else t.data_ptr() + start * t.element_size() for t in operands]
        rows.append([master, grad_index, start * grad_size, *rest, min(CHUNK, n - start)])
    return rows


if triton is not None:
    _MOMENT_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
    _GRAD_TYPES_OF = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    assert set(_GRAD_TYPES_OF) == set(_GRAD_DTYPES)

    @triton.jit
    def _address(row, column: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
        # a pointer from the table; one made from an integer carries no alignment the compiler
        # can see, so without the hint every load and store would be a 4-byte (or 2-byte) one
        pointer = tl.load(row + column).to(tl.pointer_type(dtype))
        if ALIGNED:
            pointer = tl.multiple_of(pointer, 16)
        return pointer

    @triton.jit
    def _adamw_chunks(table, bases, step_ptr, scale_ptr, found_inf_ptr, lr, weight_decay, beta1, beta2, log2_beta1,
                      log2_beta2, eps, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, COPY: tl.constexpr, GRAD: tl.constexpr, EXP_AVG: tl.constexpr,
                      EXP_AVG_SQ: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # a row of the table: master's address, the gradient's index into ``bases`` and byte
        # offset, the addresses of exp_avg, exp_avg_sq, copy (0: none); elements
        row = table + tl.program_id(0).to(tl.int64) * 7
        master = _address(row, 0, tl.float32, ALIGNED)
        grad = (tl.load(bases + tl.load(row + 1)) + tl.load(row + 2)).to(tl.pointer_type(GRAD))
        if ALIGNED:
            grad = tl.multiple_of(grad, 16)
        exp_avg = _address(row, 3, EXP_AVG, ALIGNED)  # the moments' element types (float32 or bf16)
        exp_avg_sq = _address(row, 4, EXP_AVG_SQ, ALIGNED)
        n = tl.load(row + 6).to(tl.int32)
        if HAS_FOUND_INF:  # a non-finite grad norm: every element masked off, nothing read or written
            n = tl.where(tl.load(found_inf_ptr) != 0, 0, n)
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
            g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
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
                tl.store(_address(row, 5, tl.bfloat16, ALIGNED) + offs, p.to(tl.bfloat16),
                         mask=mask)
            elif COPY == 2:
                tl.store(_address(row, 5, tl.float16, ALIGNED) + offs, p.to(tl.float16),
                         mask=mask)
            elif COPY == 3:
                tl.store(_address(row, 5, tl.float32, ALIGNED) + offs, p, mask=mask)
