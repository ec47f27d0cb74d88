"""The largest pre-softmax attention logit of each query head (``--qk-clip``,
``--log-max-attention-logit``), without materialising the attention matrix.

The attention kernels (SDPA, flash, cuDNN) return the output and the log-sum-exp, not the
maximum, so the maximum is a separate pass over the same queries and keys, under no_grad. It
runs wherever the attention core sees a block of queries and keys (the plain core, the
all-gather and ring context-parallel cores), so the maximum covers exactly the logits softmax
saw. Two versions:

- on CUDA, for bf16 and fp16, a Triton kernel: each program takes a block of one head's
  queries through the key blocks its causal mask lets it see, keeping each row's running
  maximum in registers, as flash attention keeps its running maximum; no logit reaches memory;
- elsewhere (CPU, float32 and float64 tests) torch in query chunks, each against only the keys
  it sees, so at most ``CHUNK_BYTES`` of logits exist at once.

The cost, one ``Q K^T`` product again, is measured in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megamoe.eager import eager_under_compile
from megamoe.numerics import upcast_dtype

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

CHUNK_BYTES = 256 * 2**20  # logits of one query chunk, all heads of the micro-batch


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
               chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per query head, ``max_ij scale * q_i . k_j`` over the pairs attention scores: ``q``
    ``[b, heads, sq, d]``, ``k`` ``[b, kv_heads, sk, d]`` (a query head sees key head
    ``head // (heads / kv_heads)``); ``causal``: query ``i`` sees keys ``j <= i + sk - sq`` (the
    bottom-right alignment, which for ``sq == sk`` is the square lower triangle). Returns
    ``[heads]`` in float32 (float64 for float64 inputs); ``-inf`` for a head that saw no key."""
    if triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _triton_max_logits(q, k, scale, causal)
    return chunked_max_logits(q, k, scale, causal, chunk_bytes)


def chunked_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                       chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """:func:`max_logits` in torch: the queries in chunks of ``chunk_bytes`` of logits."""
    b, heads, sq, d = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # contiguous once: the attention cores pass permuted views, which every chunk's batched
    # matmul would otherwise copy whole (the first version did: +19% step time on the proxy)
    qg = q.reshape(b, kv_heads, group, sq, d).contiguous()  # GQA by broadcasting, no copy of the keys
    kg = k.unsqueeze(2).contiguous()
    offset = sk - sq
    rows = max(1, chunk_bytes // max(1, b * heads * sk * q.element_size()))
    best = torch.full((kv_heads, group), float("-inf"), dtype=upcast_dtype(q.dtype), device=q.device)
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        visible = min(sk, r1 + offset) if causal else sk
        if visible <= 0:
            continue
        logits = qg[:, :, :, r0:r1] @ kg[:, :, :, :visible].transpose(-1, -2)  # [b, kv, g, rows, visible]
        # keys before ``seen_by_all`` are visible to every query of the chunk: only the last
        # columns (a small triangle) need the mask
        seen_by_all = max(0, min(visible, r0 + offset + 1)) if causal else visible
        # each row's maximum first: a reduction along contiguous memory, then the small rest
        if seen_by_all:
            best = torch.maximum(best, logits[..., :seen_by_all].amax(dim=-1).amax(dim=(0, 3)).to(best.dtype))
        if seen_by_all < visible:
            key = torch.arange(seen_by_all, visible, device=q.device)
            query = torch.arange(r0, r1, device=q.device) + offset
            tail = logits[..., seen_by_all:].masked_fill(key > query[:, None], float("-inf"))
            best = torch.maximum(best, tail.amax(dim=-1).amax(dim=(0, 3)).to(best.dtype))
    return best.reshape(heads) * scale


def _triton_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    b, heads, sq, d = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    blocks = triton.cdiv(sq, _BLOCK_M)
    out = torch.empty(b * heads * blocks, dtype=torch.float32, device=q.device)  # each block's maximum
    _max_logit_kernel[(blocks, b * heads)](
        q, k, out, heads, heads // kv_heads, sq, sk, sk - sq, d, *q.stride(), *k.stride(),
        CAUSAL=causal, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=8,
        num_stages=3)
    return out.view(b, heads, blocks).amax(dim=(0, 2)) * scale


# The best of nine block shapes on one H200 for MLA's proxy layer ([8, 16, 4096, 192], causal):
# 1.23 ms, against 1.40 ms for 64 x 64 with 4 warps (docs/benchmarks.md)
_BLOCK_M, _BLOCK_N = 128, 64

if triton is not None:

    @triton.jit
    def _max_logit_kernel(q_ptr, k_ptr, out_ptr, heads, group, sq, sk, offset, d,
                          q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (query block m, batch x head bh): the largest logit of the block's rows
        m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_ss + dims[None, :] * q_sd,
                    mask=(rows[:, None] < sq) & (dims[None, :] < d), other=0.0)
        k_base = k_ptr + b * k_sb + (h // group) * k_sh
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        end = sk
        if CAUSAL:  # the block's last row sees keys up to (m + 1) * BLOCK_M - 1 + offset
            end = tl.minimum(sk, (m + 1) * BLOCK_M + offset)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kb = tl.load(k_base + cols[:, None] * k_ss + dims[None, :] * k_sd,
                         mask=(cols[:, None] < sk) & (dims[None, :] < d), other=0.0)
            logits = tl.dot(q, tl.trans(kb))
            seen = (rows[:, None] < sq) & (cols[None, :] < sk)
            if CAUSAL:
                seen = seen & (cols[None, :] <= rows[:, None] + offset)
            best = tl.maximum(best, tl.max(tl.where(seen, logits, float("-inf")), 1))
        tl.store(out_ptr + bh * tl.num_programs(0) + m, tl.max(best, 0))


class MaxLogitTracker:
    """One attention layer's running per-head maximum (this rank's heads) since :meth:`take`."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None

    @eager_under_compile  # a side record, not part of the graph (--compile)
    def observe(self, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> None:
        """Fold in the logits of ``q`` against ``k`` (heads-first, as :func:`max_logits`)."""
        seen = max_logits(q, k, scale, causal)
        self.value = seen if self.value is None else torch.maximum(self.value, seen)

    def take(self) -> Optional[torch.Tensor]:
        value, self.value = self.value, None
        return value
