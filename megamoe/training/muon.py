"""Muon (``--optimizer muon``): momentum, Newton–Schulz orthogonalisation of the whole matrix,
a shape-dependent scale; AdamW for what is not a matrix.

For each weight matrix ``W`` (``m x n``) with float32 main gradient ``G``::

    M = mu M + (1 - mu) G                       (momentum, an EMA; --muon-momentum)
    U = G + mu (M - G)  with --muon-nesterov, else U = M
    O = NS(U)                                   (--muon-num-ns-steps of X <- aX + (bA + cA^2)X,
                                                 A = X X^T, from X = U / |U|_F; --muon-coefficient-type;
                                                 float32 matmuls at --muon-fp32-matmul-prec)
    W = W (1 - lr wd) - lr s O                  (s: --muon-scale-mode x --muon-extra-scale-factor)

with ``s`` = sqrt(max(m, n)) ('spectral'; with an extra factor 0.2 this is Moonlight's update,
whose RMS matches AdamW's), sqrt(max(1, m / n)) ('shape_scaling') or sqrt(m / n)
('unit_rms_norm'), as Megatron-LM defines them. The EMA and the plain sum of Moonlight's paper
give the same ``O``: Newton–Schulz starts by normalising.

**Roles** come from the parameter specs (``megamoe/parallel/param_spec.py``): Muon runs on
linear weights, the routers' weights and the experts' (each expert its own matrices, and an
expert's fused [gate | up] projection as the two matrices it is); AdamW (``--lr``,
``--weight-decay``, ``--adam-*``) on embeddings, the output head, norms and biases.

**The whole matrix in every layout.** Newton–Schulz needs the matrix whole; a shard's update
would depend on the layout (Megatron's ``--muon-tp-mode blockwise``). A matrix cut over TP or
expert-TP is gathered over that group, every rank of it orthogonalises the same whole matrix
(Megatron's ``duplicated``), and keeps its shard of the result. Expert parallelism needs
nothing: experts are separate matrices. What moves: per step, each TP-cut matrix's momentum
update, all-gathered over TP in float32 (``(tp - 1) / tp`` of the matrix per rank). With the
distributed optimizer each matrix is orthogonalised by one data-parallel rank
(:mod:`megamoe.training.distributed_muon`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from megamoe.config import ParallelConfig, TrainingConfig
from megamoe.numerics import upcast
from megamoe.parallel import mappings
from megamoe.parallel.data_parallel import DataParallelGrads
from megamoe.parallel.param_spec import ParamSpec, spec_of
from megamoe.parallel.state import ParallelState
from megamoe.training.optimizer import MasterEdit, Optimizer, adamw, tensor_bytes

# Newton–Schulz coefficients (a, b, c) per iteration; past the list's end the last one repeats.
COEFFICIENTS = {
    "simple": [(3.4445, -4.7750, 2.0315)],  # Keller Jordan's Muon
    "quintic": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],  # tuned per step (modded-nanogpt)
}
MATRIX_ROLES = ("linear", "router", "expert")
NS_EPS = 1e-7


def newton_schulz(u: torch.Tensor, steps: int, coefficients: list[tuple[float, float, float]]) -> torch.Tensor:
    """The orthogonal polar factor of each matrix of ``u`` (``[..., m, n]``), approximately."""
    x = u / (torch.linalg.matrix_norm(u, keepdim=True) + NS_EPS)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        x = x.mT
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


# --muon-fp32-matmul-prec -> torch.set_float32_matmul_precision
MATMUL_PRECISION = {"high": "highest", "medium": "high", "low": "medium"}


@contextlib.contextmanager
def float32_matmul_precision(level: str):
    """Newton-Schulz's float32 matmuls at ``level`` (TF32 or bf16 inputs on GPUs), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[level])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def scale_factor(m: int, n: int, mode: str) -> float:
    if mode == "spectral":
        return math.sqrt(max(m, n))
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, m / n))
    if mode == "unit_rms_norm":
        return math.sqrt(m / n)
    raise ValueError(f"--muon-scale-mode {mode}: expected spectral, shape_scaling or unit_rms_norm")


def is_matrix(p: nn.Parameter) -> bool:
    return spec_of(p).role in MATRIX_ROLES and p.ndim >= 2


def _whole_matrices(p: nn.Parameter) -> tuple[int, int, int]:
    """``(count, rows, cols)`` of the whole matrices in one leading index of ``p``: two for a
    fused [gate | up] weight, one otherwise (its global shape, whatever TP cut)."""
    spec = spec_of(p)
    split = spec.split_at(len(spec.shape) - 2)
    parts = split.parts if split is not None else 1
    return parts, spec.shape[-2] // parts, spec.shape[-1]


def newton_schulz_cost(p: nn.Parameter) -> int:
    """Multiply-adds of one Newton-Schulz iteration on one whole matrix of ``p`` (each expert's,
    each half of a fused [gate | up] one): what balances the distributed optimizer's owners."""
    parts, m, n = _whole_matrices(p)
    return parts * m * n * min(m, n)


def orthogonalising_ranks(p: nn.Parameter, state: ParallelState, distributed: bool) -> int:
    """How many ranks share the orthogonalisation of ``p``'s matrices: with the distributed
    optimizer its data-parallel group, whose ranks own its matrices in turn
    (``distributed_muon.py``); otherwise 1, every rank doing all of them."""
    return spec_of(p).grad_groups(state)[1].size if distributed else 1


def newton_schulz_flops(p: nn.Parameter, steps: int) -> int:
    """FLOPs of orthogonalising every whole matrix of this rank's ``p`` (its local experts): per
    iteration on a k x l matrix (k <= l), ``A = X X^T`` and ``B X`` at 2 k^2 l each, ``A A`` at
    2 k^3."""
    parts, m, n = _whole_matrices(p)
    k, l = min(m, n), max(m, n)
    matrices = parts * (p.numel() // (p.shape[-2] * p.shape[-1]))
    return matrices * steps * (4 * k * k * l + 2 * k**3)


def momentum_update(buf: torch.Tensor, g: torch.Tensor, t: TrainingConfig) -> torch.Tensor:
    """Advance Muon's momentum ``buf`` by the gradient ``g`` (in place); the update to
    orthogonalise. Elementwise, so it runs on any slice of a matrix."""
    buf.lerp_(g, 1 - t.muon_momentum)
    return g.lerp(buf, t.muon_momentum) if t.muon_nesterov else buf


def _gather_dim(t: torch.Tensor, spec: ParamSpec, dim: int, state: ParallelState) -> torch.Tensor:
    """``t`` (this rank's shard) with local dimension ``dim`` gathered whole over its split's
    group, parts in order (a fused [gate | up] dimension stays [gate | up])."""
    split = spec.split_at(dim + len(spec.index))
    if split is None or state.group(split.group).size == 1:
        return t
    group = state.group(split.group)
    gathered = mappings.all_gather(t.movedim(dim, 0).contiguous(), group, dim=0)  # [n x parts x piece, ...]
    n, parts = group.size, split.parts
    piece = t.shape[dim] // parts
    rest = gathered.shape[1:]
    # rank-major [r][part][piece] -> part-major [part][r][piece]
    whole = gathered.view(n, parts, piece, *rest).transpose(0, 1).reshape(n * parts * piece, *rest)
    return whole.movedim(0, dim)


def _own_shard(whole: torch.Tensor, spec: ParamSpec, dim: int, state: ParallelState) -> torch.Tensor:
    """The inverse of :func:`_gather_dim`: this rank's slice of each part of dimension ``dim``."""
    split = spec.split_at(dim + len(spec.index))
    if split is None or state.group(split.group).size == 1:
        return whole
    group = state.group(split.group)
    parts = split.parts
    piece = whole.shape[dim] // (parts * group.size)
    chunks = whole.movedim(dim, 0).unflatten(0, (parts, group.size, piece))[:, group.rank]
    return chunks.reshape(parts * piece, *chunks.shape[2:]).movedim(0, dim)


def orthogonalized_update(u: torch.Tensor, p: nn.Parameter, state: ParallelState, t: TrainingConfig) -> torch.Tensor:
    """This rank's shard of the scaled, orthogonalised update of the whole matrices of ``p``
    (``u``: its local momentum update)."""
    spec = spec_of(p)
    rows, cols = u.ndim - 2, u.ndim - 1
    whole = _gather_dim(_gather_dim(u, spec, rows, state), spec, cols, state)
    split = spec.split_at(rows + len(spec.index))
    parts = split.parts if split is not None else 1
    # a fused [gate | up] dimension holds two matrices: orthogonalise each
    matrices = whole.unflatten(rows, (parts, whole.shape[rows] // parts)).movedim(rows, 0)
    m, n = matrices.shape[-2], matrices.shape[-1]
    # 'low' iterates in bf16 on GPUs (Keller Jordan's Muon), the others in float32 at their precision
    work = torch.bfloat16 if t.muon_fp32_matmul_prec == "low" and matrices.is_cuda else matrices.dtype
    with float32_matmul_precision(t.muon_fp32_matmul_prec):
        ortho = newton_schulz(matrices.to(work), t.muon_num_ns_steps, COEFFICIENTS[t.muon_coefficient_type])
    ortho = ortho.to(matrices.dtype)
    ortho = ortho * (scale_factor(m, n, t.muon_scale_mode) * t.muon_extra_scale_factor)
    whole = ortho.movedim(0, rows).flatten(rows, rows + 1)
    return _own_shard(_own_shard(whole, spec, cols, state), spec, rows, state)


class MomentumStates:
    """Muon's momentum buffers (``self.momentum``) in an optimizer's memory accounting and
    resets; mixed into both Muon optimizers ahead of their AdamW base."""

    momentum: dict

    def memory_bytes(self) -> dict[str, int]:
        out = super().memory_bytes()
        out["adam_states"] += tensor_bytes(self.momentum.values())
        return out

    def reset_masters_from_params(self) -> None:
        super().reset_masters_from_params()
        self.momentum.clear()


class MixedPrecisionMuon(MomentumStates, Optimizer):
    """Muon over float32 masters of ``model``'s weight matrices, AdamW over the rest; gradients
    all-reduced in buckets as :class:`~megamoe.training.optimizer.MixedPrecisionAdamW` does."""

    dp_sharded = False

    def __init__(self, model: nn.Module, t: TrainingConfig, state: ParallelState,
                 parallel: Optional[ParallelConfig] = None):
        parallel = parallel or ParallelConfig()
        self.t, self.state = t, state
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = DataParallelGrads(self.params, state, overlap=parallel.overlap_grad_reduce,
                                       bucket_size=parallel.ddp_bucket_size)
        self.masters_are_params = all(upcast(p).dtype == p.dtype for p in self.params)
        self.masters = self.params if self.masters_are_params else [upcast(p.detach()).clone() for p in self.params]
        self.matrices = [i for i, p in enumerate(self.params) if is_matrix(p)]
        self.others = [i for i, p in enumerate(self.params) if not is_matrix(p)]  # AdamW's
        self.optimizer = adamw([self.masters[i] for i in self.others], [self.params[i].ndim >= 2 for i in self.others],
                               t)
        self.momentum: dict[int, torch.Tensor] = {}  # by parameter index, created at the first step

    def grad_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, p.main_grad) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float, edit_masters: Optional[MasterEdit] = None) -> None:
        t = self.t
        divisor = self._grad_scale  # a clip left to the fused AdamW: Muon applies it here
        for i in self.matrices:
            p, master = self.params[i], self.masters[i]
            g = p.main_grad if divisor is None else p.main_grad / divisor
            buf = self.momentum.get(i)
            if buf is None:
                buf = self.momentum[i] = torch.zeros_like(master)
            u = momentum_update(buf, g, t)
            master.mul_(1 - lr * t.weight_decay)
            master.add_(orthogonalized_update(u, p, self.state, t), alpha=-lr)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for i in self.others:
                self.masters[i].grad = self.params[i].main_grad
            self._torch_step()
            for i in self.others:
                self.masters[i].grad = None
        self._grad_scale = None
        if edit_masters is not None:
            edit_masters(self.master_pieces())
        if not self.masters_are_params:
            torch._foreach_copy_(self.params, self.masters)

    def master_bytes(self) -> int:
        return 0 if self.masters_are_params else tensor_bytes(self.masters)

    def _all_states(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.momentum:
            return {"momentum_buffer": self.momentum[i]}
        return self._states(self.masters[i])

    def state_pieces(self):
        out = []
        for i, (p, master) in enumerate(zip(self.params, self.masters)):
            tensors = {} if self.masters_are_params else {"master": master}
            out.append((p, 0, {**tensors, **self._all_states(i)}))
        return out

    def ensure_state(self) -> None:
        super().ensure_state()
        for i in self.matrices:
            self.momentum.setdefault(i, torch.zeros_like(self.masters[i]))
