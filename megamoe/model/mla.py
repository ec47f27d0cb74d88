"""Multi-head latent attention (DeepSeek-V2/V3), with tensor and sequence parallelism.

    q      = wq_b(q_norm(wq_a(x)))           (or wq(x) when q_lora_rank is 0)
    latent, k_rope = split(wkv_a(x))         latent: kv_lora_rank, k_rope: one rope key for all heads
    k_nope, v      = split(wkv_b(kv_norm(latent)))

The latent norms ``q_norm`` and ``kv_norm`` exist with ``qk_layernorm`` (DeepSeek's models have
them; Megatron-LM builds them only with ``--qk-layernorm``, and so does megamoe).
    q = [q_nope, rope(q_rope)], k = [k_nope, rope(k_rope) broadcast over heads]
    out = wo(softmax(q k^T * scale) v)

Tensor parallel: the down-projections (``wq_a``, ``wkv_a``) and their norms are replicated,
the up-projections (``wq_b``/``wq``, ``wkv_b``) column-parallel over heads, ``wo`` row-parallel.
With sequence parallel the down-projections run on this rank's sequence shard and the
up-projections gather the (small) latents, not the hidden states. The shared rope key feeds
this rank's heads only, so its gradient is a partial sum over TP: it enters the TP region
through ``enter_tensor_region`` like every other replicated input.

Context parallel: the ranks exchange the normalised latent and the rotated rope key
(``kv_lora_rank + qk_pos_emb_head_dim`` values per token) and expand the keys and values
themselves: with ``cp_comm_type="p2p"`` the ring passes them around and every block is expanded
by ``wkv_b`` as it arrives (``parallel/ring_attention.py``); with ``"allgather"`` one all-gather
brings the whole sequence's, which each rank expands at once. ``cp_exchange="expanded"``
exchanges the expanded keys and values instead, under either (for measuring the trade-off:
``tools/bench_cp.py``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.kernels.max_logit import MaxLogitTracker
from megamoe.model.attention import attend
from megamoe.model.norm import build_norm
from megamoe.model.rope import RotaryEmbedding
from megamoe.parallel import mappings
from megamoe.parallel.context_parallel import gather_sequence
from megamoe.parallel.random import RNGStatesTracker, recompute_with_rng
from megamoe.parallel.ring_attention import latent_ring_attention
from megamoe.parallel.state import Group
from megamoe.parallel.tensor_parallel import (
    ColumnParallelLinear,
    InitFn,
    ReplicatedLinear,
    RowParallelLinear,
    normal_init,
)


class MultiHeadLatentAttention(nn.Module):
    """MLA with DeepSeek's parameter names (wq_a, q_norm, wq_b / wq, wkv_a, kv_norm, wkv_b, wo)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: Optional[int],
        kv_lora_rank: int,
        qk_head_dim: int,
        qk_pos_emb_head_dim: int,
        v_head_dim: int,
        rope: RotaryEmbedding,
        tp: Group,
        sequence_parallel: bool = False,
        cp: Optional[Group] = None,
        cp_comm_type: Literal["p2p", "allgather"] = "allgather",
        cp_exchange: Literal["latent", "expanded"] = "latent",
        qk_layernorm: bool = True,
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
        if num_heads % tp.size:
            raise ValueError(f"attention heads ({num_heads}) must be divisible by the tensor-parallel size ({tp.size})")
        sp = sequence_parallel and tp.size > 1
        self.tp, self.sequence_parallel, self.rope = tp, sp, rope
        self.cp = cp if cp is not None and cp.size > 1 else None
        self.cp_comm_type, self.cp_exchange = cp_comm_type, cp_exchange
        self._gather = self.cp is not None and cp_comm_type == "allgather"
        self.num_local_heads = num_heads // tp.size
        self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim = kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim
        self.attention_dropout = attention_dropout
        self.recompute_core = False  # selective recompute: keep no attention activations
        self.max_logits: Optional[MaxLogitTracker] = None  # set by training to record them (qk_clip.py)
        self.softmax_scale = rope.softmax_scale_multiplier / math.sqrt(qk_head_dim + qk_pos_emb_head_dim)
        q_dim = num_heads * (qk_head_dim + qk_pos_emb_head_dim)
        common = dict(device=device, dtype=dtype)
        column = dict(tp=tp, sequence_parallel=sp, init_fn=init_fn, fp8=fp8, **common)

        def latent_norm(dim: int):
            return build_norm(normalization, dim, norm_eps, sequence_parallel=sp, **common) if qk_layernorm else nn.Identity()

        if q_lora_rank:
            self.wq_a = ReplicatedLinear(hidden_size, q_lora_rank, grad_partial_over_tp=sp, init_fn=init_fn, fp8=fp8,
                                         **common)
            self.q_norm = latent_norm(q_lora_rank)
            self.wq_b = ColumnParallelLinear(q_lora_rank, q_dim, **column)
        else:
            self.wq = ColumnParallelLinear(hidden_size, q_dim, **column)
        self.wkv_a = ReplicatedLinear(hidden_size, kv_lora_rank + qk_pos_emb_head_dim,
                                      grad_partial_over_tp=sp, init_fn=init_fn, fp8=fp8, **common)
        self.kv_norm = latent_norm(kv_lora_rank)
        # wkv_b's input enters the TP region in forward (so context parallel can gather it first)
        self.wkv_b = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_head_dim + v_head_dim), input_comm=False,
                                          **column)
        self.wo = RowParallelLinear(num_heads * v_head_dim, hidden_size, tp=tp, sequence_parallel=sp,
                                    init_fn=output_init_fn, fp8=fp8, **common)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rng_tracker: Optional[RNGStatesTracker] = None) -> torch.Tensor:
        # x: [s, b, hidden], or this rank's [s/tp, b, hidden] shard with sequence parallel.
        # Without sequence parallel x is replicated; the replicated down-projections then see the
        # full sequence and their gradients are already complete on every rank.
        heads = self.num_local_heads
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_b") else self.wq(x)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = mappings.enter_tensor_region(self.kv_norm(latent), self.tp, self.sequence_parallel)
        k_rope = mappings.enter_tensor_region(k_rope.contiguous(), self.tp, self.sequence_parallel)
        s, b = latent.shape[0], latent.shape[1]
        k_rope = self.rope(k_rope.unsqueeze(2), positions)  # [s, b, 1, rope_dim]
        dropout = self.attention_dropout if self.training else 0.0
        recompute = self.recompute_core and self.training
        if self.cp is not None and self.cp_comm_type == "p2p" and self.cp_exchange == "latent":
            q_nope, q_rope = q.view(s, b, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
            q = torch.cat([q_nope, self.rope(q_rope, positions)], dim=-1)
            args = (q, latent, k_rope, self.wkv_b, self.nope_dim, self.v_dim, self.cp, self.softmax_scale, dropout,
                    rng_tracker, self.max_logits)
            if recompute:
                return self.wo(recompute_with_rng(latent_ring_attention, *args, rng_tracker=rng_tracker))
            return self.wo(latent_ring_attention(*args))
        if self._gather and self.cp_exchange == "latent":
            latent, k_rope = gather_sequence(latent, self.cp), gather_sequence(k_rope, self.cp)
        kv = self.wkv_b(latent)
        s_kv = kv.shape[0]  # the whole sequence once the latent is gathered
        q_nope, q_rope = q.view(s, b, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        k_nope, v = kv.view(s_kv, b, heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, self.rope(q_rope, positions)], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(s_kv, b, heads, self.rope_dim)], dim=-1)
        if self._gather and self.cp_exchange == "expanded":
            k, v = gather_sequence(k, self.cp), gather_sequence(v.contiguous(), self.cp)
        return self.wo(attend(q, k, v, self.softmax_scale, dropout, rng_tracker, recompute, self.cp,
                              self.cp_comm_type, self.max_logits))
