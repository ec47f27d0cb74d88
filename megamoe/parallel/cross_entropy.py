"""The output projection and the vocab-parallel cross entropy, fused and computed in chunks of
tokens, so neither the full float32 logits nor their gradient is ever held.

Shape legend: T tokens (this rank's, gathered over TP when sequence parallel), D hidden,
V this rank's vocabulary shard, C tokens per chunk.

For each chunk: logits_CV = x_CD @ W_VD^T in the weight's dtype, then in float32 (or float64 for
float64 inputs) the max, the target logit and the sum of exponentials, each all-reduced over TP
(the logits never leave their rank). The loss is ``sum_t weight_t * (log sum exp - target
logit)``. While the chunk's softmax is at hand, its gradient ``weight_t * (softmax - onehot)``
is turned into the chunk's input gradient (``g_CV @ W``) and added into the weight gradient
(``g^T @ x``), both kept in float32; backward only scales them by the incoming scalar. The arithmetic is
the unfused loss's; only the order of the additions over chunks differs. Vocabulary padding
rows (columns at or past ``vocab_size``) are masked to -inf.

The input gradient returned is this rank's partial sum over its vocabulary shard: the caller
passes ``x`` through ``mappings.enter_tensor_region``, whose backward sums it over TP.
"""

from __future__ import annotations

from typing import Optional

import torch

from megamoe.numerics import upcast
from megamoe.parallel import mappings
from megamoe.parallel.state import Group

# Float32 logits per chunk: about this many bytes (the chunk's working set).
CHUNK_BYTES = 1 << 30


def chunk_tokens(local_vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits take about ``chunk_bytes``."""
    return max(128, chunk_bytes // (4 * local_vocab) // 128 * 128)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with the product kept at (at least) float32: bf16 GEMMs on CUDA write float32
    directly instead of rounding each chunk's weight gradient to bf16."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    return (a @ b).to(upcast(a).dtype)


def _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp: Group, vocab_size: int, chunk: int,
                  grad_x: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]) -> torch.Tensor:
    """The weighted loss sum; fills ``grad_x`` / ``grad_w`` (when given) with its gradients."""
    T, V = x_TD.shape[0], weight_VD.shape[0]
    math = upcast(x_TD).dtype
    vocab_start = tp.rank * V
    first_padded = max(vocab_size - vocab_start, 0)  # local columns from here on are padding
    outside_T = (target_T < vocab_start) | (target_T >= vocab_start + V)
    local_target_T = (target_T - vocab_start).masked_fill(outside_T, 0)
    loss = torch.zeros((), dtype=math, device=x_TD.device)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        x_CD = x_TD[start:end]
        logits_CV = (x_CD @ weight_VD.t()).to(math)
        if first_padded < V:
            logits_CV[:, first_padded:] = float("-inf")
        max_C = logits_CV.amax(dim=-1)
        mappings.all_reduce_(max_C, tp, op=torch.distributed.ReduceOp.MAX)
        logits_CV.sub_(max_C.unsqueeze(-1))
        target_C = logits_CV.gather(-1, local_target_T[start:end].unsqueeze(-1)).squeeze(-1)
        target_C = target_C.masked_fill(outside_T[start:end], 0.0)
        mappings.all_reduce_(target_C, tp)
        logits_CV.exp_()
        sum_exp_C = logits_CV.sum(dim=-1)
        mappings.all_reduce_(sum_exp_C, tp)
        w_C = loss_weight_T[start:end].to(math)
        loss += ((sum_exp_C.log() - target_C) * w_C).sum()
        if grad_x is None and grad_w is None:
            continue
        # the chunk's logit gradient, in place: w * (softmax - onehot)
        logits_CV.div_(sum_exp_C.unsqueeze(-1))
        inside_C = (~outside_T[start:end]).to(math)
        logits_CV.scatter_add_(-1, local_target_T[start:end].unsqueeze(-1), -inside_C.unsqueeze(-1))
        logits_CV.mul_(w_C.unsqueeze(-1))
        g_CV = logits_CV.to(x_TD.dtype)
        if grad_x is not None:
            grad_x[start:end] = _mm_float32(g_CV, weight_VD)
        if grad_w is not None:
            grad_w.add_(_mm_float32(g_CV.t(), x_CD))
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_VD, target_T, loss_weight_T, tp: Group, vocab_size: int, chunk: int):
        math = upcast(x_TD).dtype
        grad_x = torch.empty(x_TD.shape, dtype=math, device=x_TD.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight_VD.shape, dtype=math, device=x_TD.device) if ctx.needs_input_grad[1] else None
        loss = _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk, grad_x, grad_w)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x_TD.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # scaled at float32 (the scalar is 1 / tokens, far below bf16's resolution), then cast
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:
            grad_x = (grad_x * grad_loss).to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.dtypes[1])
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(x_TD: torch.Tensor, weight_VD: torch.Tensor, target_T: torch.Tensor,
                         loss_weight_T: torch.Tensor, tp: Group, vocab_size: int,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """``sum_t loss_weight_t * cross_entropy(x_t W^T, target_t)`` (float32, or float64 for float64
    inputs) over a vocabulary split over TP: ``weight_VD`` is this rank's ``V = padded / tp``
    rows, ``vocab_size`` the real (unpadded) vocabulary. ``x_TD`` must be the same on every TP
    rank (see the module docstring). ``chunk``: tokens per chunk (default: about 1 GiB of
    float32 logits)."""
    chunk = chunk or chunk_tokens(weight_VD.shape[0])
    if not torch.is_grad_enabled():  # evaluation: no gradients to prepare
        return _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk, None, None)
    return _LinearCrossEntropy.apply(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk)
