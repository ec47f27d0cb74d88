"""Context parallelism: each sequence is sharded over the CP ranks; attention exchanges keys
and values so every query still sees its whole causal prefix.

**Sharding (load-balanced for causal attention).** A sequence of ``S`` tokens is cut into
``2 cp`` chunks of ``c = S / (2 cp)``; CP rank ``i`` holds chunks ``i`` and ``2 cp - 1 - i``. An
early chunk has a short prefix and a late one a long one, so every rank does the same attention
work: ``(2 cp + 1) c^2`` query-key pairs. Positions (RoPE), labels and the loss mask follow the
same indices (:func:`sequence_shard_indices`).

**Exchange (``--cp-comm-type allgather``).** Each rank all-gathers the keys and values of the
CP group (backward: reduce-scatter of their gradients), puts them in sequence order, and runs two
attentions: chunk ``i``'s queries against the first ``(i + 1) c`` keys, chunk ``2 cp - 1 - i``'s
against the first ``(2 cp - i) c``, each causal aligned at the bottom right. This is exact
causal attention with one collective per layer, for both GQA and MLA, and takes attention
dropout. The ring (``p2p``, the default: :mod:`megamoe.parallel.ring_attention`) passes the
keys and values around instead, overlapped with blockwise attention. The all-gather's cost is

    per layer and rank, forward: (cp - 1) / cp x S x b x (bytes of one token's K and V)

(the same again in backward, for the gradients). For GQA one token's K and V are
``2 x kv_heads x head_dim`` values. For MLA it is cheaper to exchange the compressed latent
plus the shared rope key, ``kv_lora_rank + qk_pos_emb_head_dim`` values (576 for DeepSeek-V3),
than the expanded keys and values, ``heads x (qk_head_dim + qk_pos_emb_head_dim + v_head_dim)``
(128 x 448 = 57,344 for DeepSeek-V3 without TP): every rank then re-expands the gathered latent,
which costs one extra ``wkv_b`` GEMM over ``S`` instead of ``S / cp`` tokens. See
``megamoe/model/mla.py`` and ``tools/bench_cp.py``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megamoe.kernels.max_logit import MaxLogitTracker
from megamoe.parallel import mappings
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, RNGStatesTracker
from megamoe.parallel.state import Group


def sequence_shard_indices(seq_length: int, cp_size: int, cp_rank: int,
                           device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions of the tokens CP rank ``cp_rank`` holds: chunks ``i`` and ``2 cp - 1 - i``."""
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x the context-parallel size {cp_size}")
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, cp: Group, dim: int = 0) -> torch.Tensor:
    """This CP rank's tokens of a full-sequence tensor (no communication)."""
    if cp.size == 1:
        return x
    return x.index_select(dim, sequence_shard_indices(x.shape[dim], cp.size, cp.rank, x.device))


@functools.lru_cache(maxsize=16)
def _sequence_order(cp_size: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Row order that turns the all-gathered shards (rank 0's two chunks, rank 1's, ...) into
    sequence order. Cached: every attention layer gathers K and V with the same order."""
    gathered = torch.cat([sequence_shard_indices(2 * cp_size * chunk, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(gathered)


def gather_sequence(x: torch.Tensor, cp: Group) -> torch.Tensor:
    """All-gather ``[s/cp, ...]`` shards into the whole sequence ``[s, ...]`` in order;
    backward reduce-scatters the gradient back to the shards."""
    if cp.size == 1:
        return x
    gathered = mappings.gather_from_sequence_region(x, cp, dim=0)
    return gathered.index_select(0, _sequence_order(cp.size, x.shape[0] // 2, x.device))


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: Group,
                               softmax_scale: float, dropout_p: float = 0.0,
                               rng_tracker: Optional[RNGStatesTracker] = None,
                               max_logits: Optional[MaxLogitTracker] = None) -> torch.Tensor:
    """Causal attention of this rank's queries ``[s/cp, b, heads, d]`` (its two chunks) against
    the whole sequence's keys and values ``[s, b, kv_heads, d]`` (in order). Returns
    ``[s/cp, b, heads * dv]``. ``max_logits``: records each head's largest logit."""
    c = q.shape[0] // 2
    rank, n = cp.rank, cp.size
    if k.shape[2] != q.shape[2]:  # GQA: give every query head its key/value head
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        # MLA (qk 192, v 128): flash attention, the only fast kernel for bottom-right causal
        # masks, needs equal head dims. Zero-padding v costs a little; without it the fallback
        # kernel is 4x slower on H200 (docs/benchmarks.md).
        v = F.pad(v, (0, q.shape[-1] - dv))
    # imported here: torch.nn.attention.bias imports dynamo (2.3 s per process; megamoe/eager.py)
    from torch.nn.attention.bias import causal_lower_right

    fork = rng_tracker.fork(TENSOR_PARALLEL_STREAM) if (dropout_p and rng_tracker) else contextlib.nullcontext()
    outs = []
    with fork:
        for queries, visible in ((q[:c], (rank + 1) * c), (q[c:], (2 * n - rank) * c)):
            qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (queries, k[:visible], v[:visible]))  # [b, heads, s, d]
            mask = causal_lower_right(qh.shape[2], kh.shape[2])
            if max_logits is not None:
                max_logits.observe(qh, kh, softmax_scale, causal=True)
            outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p,
                                                       scale=softmax_scale))
    out = torch.cat(outs, dim=2)[..., :dv]  # [b, heads, s/cp, dv]
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)
