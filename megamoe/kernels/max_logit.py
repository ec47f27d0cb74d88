"""The largest pre-softmax attention logit of each query head (``--qk-clip``,
``--log-max-attention-logit``), without materialising the attention matrix.

The attention kernels (SDPA, flash, cuDNN) return the output and the log-sum-exp, not the
maximum, so the maximum is a separate pass over the same queries and keys, under no_grad: the
queries in row chunks, each chunk against only the keys its causal mask lets it see, so at most
``CHUNK_BYTES`` of logits exist at once and the masked half of the product is skipped. It runs
wherever the attention core sees a block of queries and keys (the plain core, the all-gather
and ring context-parallel cores), so the maximum covers exactly the logits softmax saw. The
cost, one ``Q K^T`` product again (about a quarter of attention's forward and backward FLOPs),
is measured in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megamoe.numerics import upcast_dtype

CHUNK_BYTES = 256 * 2**20  # logits of one query chunk, all heads of the micro-batch


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
               chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per query head, ``max_ij scale * q_i . k_j`` over the pairs attention scores: ``q``
    ``[b, heads, sq, d]``, ``k`` ``[b, kv_heads, sk, d]`` (a query head sees key head
    ``head // (heads / kv_heads)``); ``causal``: query ``i`` sees keys ``j <= i + sk - sq`` (the
    bottom-right alignment, which for ``sq == sk`` is the square lower triangle). Returns
    ``[heads]`` in float32 (float64 for float64 inputs); ``-inf`` for a head that saw no key."""
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


class MaxLogitTracker:
    """One attention layer's running per-head maximum (this rank's heads) since :meth:`take`."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None

    @torch.compiler.disable  # a side record, not part of the graph (--compile)
    def observe(self, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> None:
        """Fold in the logits of ``q`` against ``k`` (heads-first, as :func:`max_logits`)."""
        seen = max_logits(q, k, scale, causal)
        self.value = seen if self.value is None else torch.maximum(self.value, seen)

    def take(self) -> Optional[torch.Tensor]:
        value, self.value = self.value, None
        return value
