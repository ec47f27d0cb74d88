"""Token permutation for the MoE layer: copy each token to the rows of its experts, and sum the
experts' output rows back into tokens, weighted by the routing probabilities.

Shape legend: T tokens, K experts per token, D hidden, N rows (one per kept (token, k) pair,
plus padding rows).

The maps between rows and pairs are computed once per dispatch: ``pair_of_row`` [N] (the
(token, k) pair ``t * K + k`` each row copies, or ``T * K`` for a padding row) and its inverse
``row_of_pair`` [T, K] (-1 for a dropped pair). Both directions are gathers, forward and
backward alike:

- :func:`permute_tokens` (tokens -> rows): ``rows[n] = x[pair_of_row[n] // K]``, a zero row for
  a padding row; its backward sums each token's K row gradients through ``row_of_pair``.
- :func:`combine_rows` (rows -> tokens): ``out[t] = sum_k probs[t, k] * y[row_of_pair[t, k]]``,
  accumulated in float32; backward gives ``dy[n] = probs[pair] * dout[token]`` and
  ``dprobs[t, k] = <y[row], dout[t]>``.

So no index is written twice: no atomics, and the same result on every run. On CUDA with
Triton the gathers are fused kernels (``_triton_*``; one pass over the rows, no [T, K, D]
buffer); elsewhere torch's indexing does the same arithmetic.
"""

from __future__ import annotations

import torch

from megamoe.numerics import upcast

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def row_of_pair(pair_of_row: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """[num_pairs] row index of each pair, -1 where no row holds it (each pair has one row at
    most; padding rows point past ``num_pairs`` and are left out)."""
    rows = torch.full((num_pairs + 1,), -1, dtype=torch.int64, device=pair_of_row.device)
    rows[pair_of_row] = torch.arange(pair_of_row.numel(), device=pair_of_row.device)  # unique: no collisions
    return rows[:num_pairs]


def count_per_expert(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] how often each expert index occurs in ``expert_N`` (all < num_experts).
    ``torch.bincount`` would read the largest index back to the host to size its result (a
    synchronisation, and a graph break under ``--compile``); integer additions are exact, so
    the atomics leave no run-to-run variation."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    return counts.scatter_add_(0, expert_N.long(), torch.ones_like(expert_N, dtype=torch.int64))


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# ---------------------------------------------------------------------------------------------
# torch versions (CPU, and CUDA without Triton)


def _torch_pairs(y_ND, row_TK):
    """[T, K, D]: each pair's row in (at least) float32; rows -1 read a zero row."""
    T, K = row_TK.shape
    y_pad = torch.cat([y_ND, y_ND.new_zeros(1, y_ND.shape[1])])  # row -1 reads this zero row
    return y_pad[row_TK.reshape(-1)].view(T, K, -1).to(upcast(y_ND).dtype)


def _torch_gather_sum(y_ND, row_TK, w_TK):
    """sum_k w[t, k] * y[row[t, k]] in (at least) float32; rows -1 contribute nothing."""
    pairs = _torch_pairs(y_ND, row_TK)
    if w_TK is not None:
        pairs = pairs * w_TK.unsqueeze(-1).to(pairs.dtype)
    return pairs.sum(1).to(y_ND.dtype)


def _torch_rows(x_TD, token_N, w_N):
    rows = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])[token_N]  # token -1 reads the zero row
    if w_N is not None:
        rows = (rows.to(upcast(rows).dtype) * w_N.unsqueeze(-1)).to(x_TD.dtype)
    return rows


def _torch_pair_dots(y_ND, row_TK, g_TD):
    pairs = _torch_pairs(y_ND, row_TK)
    return (pairs * g_TD.unsqueeze(1).to(pairs.dtype)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Triton versions

if triton is not None:

    @triton.jit
    def _gather_sum_kernel(y_ptr, row_ptr, w_ptr, out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            r = tl.load(row_ptr + t * K + k)
            if r >= 0:
                v = tl.load(y_ptr + r * D + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
                acc += v
        tl.store(out_ptr + t.to(tl.int64) * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rows_kernel(x_ptr, token_ptr, w_ptr, out_ptr, D, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        t = tl.load(token_ptr + n)
        v = tl.load(x_ptr + t * D + offs, mask=mask & (t >= 0), other=0.0)  # token -1: a zero row
        if HAS_W:
            v = (v.to(tl.float32) * tl.load(w_ptr + n).to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + n.to(tl.int64) * D + offs, v, mask=mask)

    @triton.jit
    def _pair_dots_kernel(y_ptr, row_ptr, g_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        for k in tl.static_range(K):
            r = tl.load(row_ptr + t * K + k)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            if r >= 0:
                for start in range(0, D, BLOCK_D):
                    offs = start + tl.arange(0, BLOCK_D)
                    mask = offs < D
                    y = tl.load(y_ptr + r * D + offs, mask=mask, other=0.0).to(tl.float32)
                    g = tl.load(g_ptr + t.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
                    acc += y * g
            tl.store(out_ptr + t * K + k, tl.sum(acc, axis=0))


_BLOCK_D = 1024


def _triton_gather_sum(y_ND, row_TK, w_TK):
    T, K = row_TK.shape
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=y_ND.dtype, device=y_ND.device)
    if T:
        w = w_TK.contiguous() if w_TK is not None else row_TK  # unused pointer when HAS_W is off
        _gather_sum_kernel[(T, triton.cdiv(D, _BLOCK_D))](y_ND.contiguous(), row_TK.contiguous(), w, out, D, K=K,
                                                          HAS_W=w_TK is not None, BLOCK_D=_BLOCK_D)
    return out


def _triton_rows(x_TD, token_N, w_N):
    N, D = token_N.numel(), x_TD.shape[1]
    out = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    if N:
        w = w_N.contiguous() if w_N is not None else token_N
        _rows_kernel[(N, triton.cdiv(D, _BLOCK_D))](x_TD.contiguous(), token_N.contiguous(), w, out, D,
                                                    HAS_W=w_N is not None, BLOCK_D=_BLOCK_D)
    return out


def _triton_pair_dots(y_ND, row_TK, g_TD):
    T, K = row_TK.shape
    out = torch.empty(T, K, dtype=torch.float32, device=y_ND.device)
    if T:
        _pair_dots_kernel[(T,)](y_ND.contiguous(), row_TK.contiguous(), g_TD.contiguous(), out, y_ND.shape[1], K=K,
                                BLOCK_D=_BLOCK_D)
    return out


def _gather_sum(y_ND, row_TK, w_TK=None):
    return (_triton_gather_sum if _use_triton(y_ND) else _torch_gather_sum)(y_ND, row_TK, w_TK)


def _rows(x_TD, token_N, w_N=None):
    return (_triton_rows if _use_triton(x_TD) else _torch_rows)(x_TD, token_N, w_N)


def _pair_dots(y_ND, row_TK, g_TD):
    return (_triton_pair_dots if _use_triton(y_ND) else _torch_pair_dots)(y_ND, row_TK, g_TD)


# ---------------------------------------------------------------------------------------------
# autograd


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_of_row_N, row_TK):
        ctx.save_for_backward(row_TK)
        return _rows(x_TD, token_of_row_N)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_TK,) = ctx.saved_tensors
        return _gather_sum(grad_rows, row_TK), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, probs_TK, row_TK, token_of_row_N, pair_of_row_N):
        ctx.save_for_backward(y_ND, probs_TK, row_TK, token_of_row_N, pair_of_row_N)
        return _gather_sum(y_ND, row_TK, probs_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, probs_TK, row_TK, token_of_row_N, pair_of_row_N = ctx.saved_tensors
        grad_y = grad_probs = None
        if ctx.needs_input_grad[0]:
            # padding rows point past the pairs: weight 0
            probs_of_row = torch.cat([probs_TK.reshape(-1), probs_TK.new_zeros(1)])[pair_of_row_N]
            grad_y = _rows(grad_TD, token_of_row_N, probs_of_row)
        if ctx.needs_input_grad[1]:
            grad_probs = _pair_dots(y_ND, row_TK, grad_TD).to(probs_TK.dtype)
        return grad_y, grad_probs, None, None, None


def _token_of_row(pair_of_row_N: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """Each row's token, -1 for a padding row (its pair points past the T * K pairs)."""
    return torch.where(pair_of_row_N < T * K, pair_of_row_N // K, -1)


def permute_tokens(x_TD: torch.Tensor, pair_of_row_N: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """Rows [N, D]: each row a copy of the token of its pair; padding rows are zero rows (so
    they add nothing to an FP8 scale either), weighted by 0 in :func:`combine_rows`."""
    token_of_row = _token_of_row(pair_of_row_N, x_TD.shape[0], row_TK.shape[1])
    return _Permute.apply(x_TD, token_of_row, row_TK)


def permute_quantized(q_TD: torch.Tensor, scale_inv_T: torch.Tensor, pair_of_row_N: torch.Tensor,
                      K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of :func:`permute_tokens` for tokens quantized row by row: (FP8 values as bytes
    [N, D] uint8, scale_inv [N]). A row is a copy of its token, so quantizing the T tokens and
    gathering equals gathering and quantizing the N rows, with K times less quantization and
    half the bytes moved. Padding rows are zero (scale_inv 1). No autograd: the caller carries
    the gradient (:func:`permute_tokens_backward`)."""
    token = _token_of_row(pair_of_row_N, q_TD.shape[0], K)
    q = _torch_rows(q_TD.view(torch.uint8), token, None)  # torch's gather: Triton's row kernel is for floats
    return q, torch.cat([scale_inv_T, scale_inv_T.new_ones(1)])[token]  # token -1 reads scale_inv 1


def permute_tokens_backward(grad_rows_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """[T, D] the gradient of :func:`permute_tokens`' input: each token's rows' gradients summed."""
    return _gather_sum(grad_rows_ND, row_TK)


def combine_rows(y_ND: torch.Tensor, probs_TK: torch.Tensor, pair_of_row_N: torch.Tensor,
            row_TK: torch.Tensor) -> torch.Tensor:
    """[T, D]: each token's probability-weighted sum of its rows (float32 accumulation, then
    the rows' dtype)."""
    T, K = probs_TK.shape
    return _Combine.apply(y_ND, probs_TK, row_TK, _token_of_row(pair_of_row_N, T, K), pair_of_row_N)
