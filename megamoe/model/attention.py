"""Grouped-query attention (GQA) with tensor parallelism, and the attention core shared with MLA.

Activations are ``[s, b, hidden]`` (``[s/tp, b, hidden]`` with sequence parallel; ``s`` is this
rank's share of the sequence under context parallelism). Query, key and value projections are
column-parallel (this rank's heads), the output projection row-parallel; the sequence is
gathered once for the three projections. ``positions`` are the global positions of the tokens.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.kernels.max_logit import MaxLogitTracker
from megamoe.model.norm import build_norm
from megamoe.model.rope import RotaryEmbedding
from megamoe.parallel import mappings
from megamoe.parallel.context_parallel import context_parallel_attention, gather_sequence
from megamoe.parallel.random import TENSOR_PARALLEL_STREAM, RNGStatesTracker, recompute_with_rng
from megamoe.parallel.ring_attention import ring_attention
from megamoe.parallel.state import Group
from megamoe.parallel.tensor_parallel import ColumnParallelLinear, InitFn, RowParallelLinear, normal_init


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    dropout_p: float = 0.0,
    rng_tracker: Optional[RNGStatesTracker] = None,
    max_logits: Optional[MaxLogitTracker] = None,
) -> torch.Tensor:
    """Causal softmax attention of ``[s, b, heads, d]`` tensors; returns ``[s, b, heads * dv]``.

    Key/value heads may be fewer than query heads (GQA). Attention-probability dropout draws
    from the tensor-parallel RNG stream: each rank holds different heads. ``max_logits``
    records each head's largest logit (``kernels/max_logit.py``).
    """
    s, b = q.shape[0], q.shape[1]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    if max_logits is not None:
        max_logits.observe(q, k, softmax_scale, causal=True)
    fork = rng_tracker.fork(TENSOR_PARALLEL_STREAM) if (dropout_p and rng_tracker) else contextlib.nullcontext()
    with fork:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def attend(q, k, v, softmax_scale, dropout_p, rng_tracker, recompute: bool, cp: Optional[Group] = None,
           cp_comm_type: str = "allgather", max_logits: Optional[MaxLogitTracker] = None) -> torch.Tensor:
    """``core_attention``, recomputed in backward instead of stored when ``recompute``
    (selective recompute, which replays the dropout masks). With context parallelism (``cp`` of
    more than one rank) ``q`` holds this rank's two chunks, and ``k``, ``v`` the whole sequence
    (``cp_comm_type="allgather"``, ``parallel/context_parallel.py``) or this rank's own chunks,
    which the ring passes around (``"p2p"``, ``parallel/ring_attention.py``). ``max_logits``:
    a tracker of each head's largest logit, or None."""
    if cp is not None and cp.size > 1:
        cp_core = ring_attention if cp_comm_type == "p2p" else context_parallel_attention
        core, args = cp_core, (q, k, v, cp, softmax_scale, dropout_p, rng_tracker, max_logits)
    else:
        core, args = core_attention, (q, k, v, softmax_scale, dropout_p, rng_tracker, max_logits)
    if recompute:
        return recompute_with_rng(core, *args, rng_tracker=rng_tracker)
    return core(*args)


class GroupedQueryAttention(nn.Module):
    """Multi-head / grouped-query attention with RoPE on the whole head dimension."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
        tp: Group,
        sequence_parallel: bool = False,
        cp: Optional[Group] = None,
        cp_comm_type: Literal["p2p", "allgather"] = "allgather",
        qk_layernorm: bool = False,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        init_fn: InitFn = normal_init(0.02),
        output_init_fn: InitFn = normal_init(0.02),
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if num_heads % tp.size or num_kv_heads % tp.size:
            raise ValueError(f"attention heads ({num_heads}) and key/value heads ({num_kv_heads}) must be "
                             f"divisible by the tensor-parallel size ({tp.size})")
        self.tp, self.sequence_parallel, self.cp = tp, sequence_parallel and tp.size > 1, cp
        self.cp_comm_type = cp_comm_type
        self.head_dim, self.rope = head_dim, rope
        self.num_local_heads, self.num_local_kv = num_heads // tp.size, num_kv_heads // tp.size
        self.attention_dropout = attention_dropout
        self.recompute_core = False  # selective recompute: keep no attention activations
        self.max_logits: Optional[MaxLogitTracker] = None  # set by training to record them (qk_clip.py)
        self.softmax_scale = 1.0 / math.sqrt(head_dim)
        kw = dict(tp=tp, sequence_parallel=sequence_parallel, fp8=fp8, device=device, dtype=dtype)
        self.wq = ColumnParallelLinear(hidden_size, num_heads * head_dim, input_comm=False, init_fn=init_fn, **kw)
        self.wk = ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, input_comm=False, init_fn=init_fn, **kw)
        self.wv = ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, input_comm=False, init_fn=init_fn, **kw)
        self.wo = RowParallelLinear(num_heads * head_dim, hidden_size, init_fn=output_init_fn, **kw)
        # QK-norm (Qwen3): a per-head norm on queries and keys; heads are local, so no SP partials.
        self.q_norm = build_norm(normalization, head_dim, norm_eps, device=device, dtype=dtype) if qk_layernorm else None
        self.k_norm = build_norm(normalization, head_dim, norm_eps, device=device, dtype=dtype) if qk_layernorm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rng_tracker: Optional[RNGStatesTracker] = None) -> torch.Tensor:
        x = mappings.enter_tensor_region(x, self.tp, self.sequence_parallel)
        s, b = x.shape[0], x.shape[1]
        q = self.wq(x).view(s, b, self.num_local_heads, self.head_dim)
        k = self.wk(x).view(s, b, self.num_local_kv, self.head_dim)
        v = self.wv(x).view(s, b, self.num_local_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if self.cp is not None and self.cp.size > 1 and self.cp_comm_type == "allgather":
            k, v = gather_sequence(k, self.cp), gather_sequence(v, self.cp)  # every query's causal prefix
        dropout = self.attention_dropout if self.training else 0.0
        return self.wo(attend(q, k, v, self.softmax_scale, dropout, rng_tracker, self.recompute_core and self.training,
                              self.cp, self.cp_comm_type, self.max_logits))
