"""The output projection and the vocab-parallel cross entropy, fused and computed in chunks of
tokens, so neither the full float32 logits nor their gradient is ever held.

Shape legend: T tokens (this rank's, gathered over TP when sequence parallel), D hidden,
V this rank's vocabulary shard, C tokens per chunk.

For each chunk: logits_CV = x_CD @ W_VD^T in the weight's dtype, then in float32 (or float64 for
float64 inputs) the max, the target logit and the sum of exponentials, each all-reduced over TP
(the logits never leave their rank). On CUDA with bf16 logits two Triton kernels do this in
registers and write the logit gradient over the logits (no float32 copy); elsewhere torch ops
work on a float32 copy of the chunk. The loss is ``sum_t weight_t * (log sum exp - target
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

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# One chunk's logits take about this many bytes (bf16 on the fused CUDA path, float32 on the
# torch path). Larger chunks make the three head GEMMs more efficient (measured on one H200 at
# vocabulary 102400: 2560-token chunks ran them at about 360 TFLOP/s).
CHUNK_BYTES = 1 << 30


def chunk_tokens(local_vocab: int, element_size: int = 4, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's logits take about ``chunk_bytes``."""
    return max(128, chunk_bytes // (element_size * local_vocab) // 128 * 128)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with the product kept at (at least) float32: bf16 GEMMs on CUDA write float32
    directly instead of rounding each chunk's weight gradient to bf16."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    return (a @ b).to(upcast(a).dtype)


def _chunk_torch(logits_CV, local_target_C, outside_C, w_C, first_padded: int, tp: Group, math, want_grad: bool):
    """(weighted loss sum, logit gradient or None) of one chunk, with torch ops on a float32
    (or float64) copy of the logits."""
    logits_CV = logits_CV.to(math)
    V = logits_CV.shape[1]
    if first_padded < V:
        logits_CV[:, first_padded:] = float("-inf")
    max_C = logits_CV.amax(dim=-1)
    mappings.all_reduce_(max_C, tp, op=torch.distributed.ReduceOp.MAX)
    logits_CV.sub_(max_C.unsqueeze(-1))
    target_C = logits_CV.gather(-1, local_target_C.unsqueeze(-1)).squeeze(-1).masked_fill(outside_C, 0.0)
    mappings.all_reduce_(target_C, tp)
    logits_CV.exp_()
    sum_exp_C = logits_CV.sum(dim=-1)
    mappings.all_reduce_(sum_exp_C, tp)
    loss = ((sum_exp_C.log() - target_C) * w_C).sum()
    if not want_grad:
        return loss, None
    # w * (softmax - onehot), in place
    logits_CV.div_(sum_exp_C.unsqueeze(-1))
    logits_CV.scatter_add_(-1, local_target_C.unsqueeze(-1), -(~outside_C).to(math).unsqueeze(-1))
    logits_CV.mul_(w_C.unsqueeze(-1))
    return loss, logits_CV


def _chunk_triton(logits_CV, local_target_C, outside_C, w_C, first_padded: int, tp: Group, math, want_grad: bool):
    """The same on CUDA with two Triton passes over the bf16 logits, which are never copied:
    per row the max, sum of exponentials (online) and target logit; after the TP all-reduces,
    the gradient written over the logits in place."""
    C, V = logits_CV.shape
    target = local_target_C.masked_fill(outside_C, -1).contiguous()
    max_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    sum_exp_C, target_C = torch.empty_like(max_C), torch.empty_like(max_C)
    _ce_stats_kernel[(C,)](logits_CV, target, max_C, sum_exp_C, target_C, V, first_padded, BLOCK=_CE_BLOCK)
    if tp.size > 1:  # merge the ranks' online softmax states
        local_max = max_C.clone()
        mappings.all_reduce_(max_C, tp, op=torch.distributed.ReduceOp.MAX)
        sum_exp_C.mul_(torch.exp(local_max - max_C))
        mappings.all_reduce_(sum_exp_C, tp)
        mappings.all_reduce_(target_C, tp)
    w_C = w_C.float().contiguous()
    loss = ((sum_exp_C.log() + max_C - target_C) * w_C).sum()
    if not want_grad:
        return loss, None
    _ce_grad_kernel[(C,)](logits_CV, target, max_C, sum_exp_C, w_C, V, first_padded, BLOCK=_CE_BLOCK)
    return loss, logits_CV


_CE_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _ce_stats_kernel(logits_ptr, target_ptr, max_ptr, sum_ptr, target_logit_ptr, V, first_padded,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * V
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < first_padded, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a shard of padding only stays at 0
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        target = tl.load(target_ptr + row)
        target_logit = tl.where(target >= 0, tl.load(base + tl.maximum(target, 0)).to(tl.float32), 0.0)
        tl.store(max_ptr + row, m)
        tl.store(sum_ptr + row, s)
        tl.store(target_logit_ptr + row, target_logit)

    @triton.jit
    def _ce_grad_kernel(logits_ptr, target_ptr, max_ptr, sum_ptr, w_ptr, V, first_padded, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * V
        m, s, w = tl.load(max_ptr + row), tl.load(sum_ptr + row), tl.load(w_ptr + row)
        target = tl.load(target_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - m) / s - tl.where(cols == target, 1.0, 0.0)
            g = tl.where(cols < first_padded, g * w, 0.0)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=inside)


def _fused(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run: CUDA, Triton, 16-bit logits."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _accumulate_grad_w(grad_w: torch.Tensor, g_CV: torch.Tensor, x_CD: torch.Tensor) -> torch.Tensor:
    """``grad_w += g^T @ x`` with the product at float32: on CUDA in the GEMM's epilogue, in
    place (no float32 product of the weight's size per chunk)."""
    if g_CV.is_cuda and g_CV.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.addmm(grad_w, g_CV.t(), x_CD, out_dtype=torch.float32, out=grad_w)
        except (TypeError, RuntimeError):  # a torch without addmm's out_dtype
            pass
    return grad_w.add_(_mm_float32(g_CV.t(), x_CD))


def _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp: Group, vocab_size: int, chunk: int,
                  grad_x: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]):
    """(the weighted loss sum, the weight gradient): fills ``grad_x`` (when given) with the
    input gradient and accumulates ``grad_w`` (when given) over the chunks."""
    T, V = x_TD.shape[0], weight_VD.shape[0]
    math = upcast(x_TD).dtype
    vocab_start = tp.rank * V
    first_padded = max(vocab_size - vocab_start, 0)  # local columns from here on are padding
    outside_T = (target_T < vocab_start) | (target_T >= vocab_start + V)
    local_target_T = (target_T - vocab_start).masked_fill(outside_T, 0)
    per_chunk = _chunk_triton if _fused(x_TD) else _chunk_torch
    want_grad = grad_x is not None or grad_w is not None
    loss = torch.zeros((), dtype=math, device=x_TD.device)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        x_CD = x_TD[start:end]
        chunk_loss, g_CV = per_chunk(x_CD @ weight_VD.t(), local_target_T[start:end], outside_T[start:end],
                                     loss_weight_T[start:end].to(math), first_padded, tp, math, want_grad)
        loss += chunk_loss
        if not want_grad:
            continue
        g_CV = g_CV.to(x_TD.dtype)
        if grad_x is not None:
            grad_x[start:end] = _mm_float32(g_CV, weight_VD)
        if grad_w is not None:
            grad_w = _accumulate_grad_w(grad_w, g_CV, x_CD)
        # let this chunk's logits go before the next chunk's are computed: held until the
        # assignment above, two chunks' logits (2 GiB at the default size) were alive at once
        del g_CV
    return loss, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_VD, target_T, loss_weight_T, tp: Group, vocab_size: int, chunk: int):
        math = upcast(x_TD).dtype
        grad_x = torch.empty(x_TD.shape, dtype=math, device=x_TD.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight_VD.shape, dtype=math, device=x_TD.device) if ctx.needs_input_grad[1] else None
        loss, grad_w = _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk, grad_x, grad_w)
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
    chunk = chunk or chunk_tokens(weight_VD.shape[0], x_TD.element_size() if _fused(x_TD) else 4)
    if not torch.is_grad_enabled():  # evaluation: no gradients to prepare
        return _chunked_loss(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk, None, None)[0]
    return _LinearCrossEntropy.apply(x_TD, weight_VD, target_T, loss_weight_T, tp, vocab_size, chunk)
