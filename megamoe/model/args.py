"""The model's own arguments, resolved once from the flags.

Megatron-LM's flags leave several sizes to rules (``--ffn-hidden-size`` from the hidden size,
key/value heads from ``--group-query-attention``, the rotary type from the attention kind,
experts' sizes from the dense MLP...). :func:`gpt_args` applies those rules in one place and
returns frozen records that the model, the FLOPs formula and the tests read, so no module
re-derives a size from the raw config and none of them sees the whole :class:`Config`.
Runtime choices (parallel layout, sequence parallel, dtype) are not here: the model takes them
separately.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megamoe.config import Config, ConfigError, ModelConfig, MoEConfig
from megamoe.kernels.fp8 import FP8_ALIGNMENT
from megamoe.model.rope import YarnScaling

Normalization = Literal["LayerNorm", "RMSNorm"]
_ROUTER_DTYPES = {None: torch.float32, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Recompute:
    """What backward recomputes instead of keeping, from ``--recompute-granularity``,
    ``--recompute-modules`` and ``--moe-layer-recompute``: the model, the activation planner,
    the FLOPs and the traffic estimates all read this one record."""

    full: bool = False  # whole blocks
    core_attn: bool = False  # the attention core (selective)
    moe: bool = False  # each MoE layer (routing, dispatch, experts, combine)
    mlp: bool = False  # the dense MLP layers
    shared_experts: bool = False  # the shared experts' MLP

    @classmethod
    def of(cls, m: ModelConfig, moe: MoEConfig) -> "Recompute":
        if m.recompute_granularity == "full":
            return cls(full=True, moe=moe.moe_layer_recompute)
        modules = set(m.recompute_modules) if m.recompute_granularity == "selective" else set()
        return cls(core_attn="core_attn" in modules, moe=moe.moe_layer_recompute or "moe" in modules,
                   mlp="mlp" in modules, shared_experts="shared_experts" in modules)

    @property
    def mlp_alone(self) -> bool:
        """The dense MLPs recomputed on their own (not inside a recomputed block)."""
        return self.mlp and not self.full

    @property
    def shared_experts_alone(self) -> bool:
        """The shared experts recomputed on their own (not inside a recomputed block or MoE layer)."""
        return self.shared_experts and not (self.full or self.moe)


@dataclass(frozen=True)
class AttentionArgs:
    """Multi-head / grouped-query attention (``kind="gqa"``) or multi-head latent attention."""

    kind: Literal["gqa", "mla"]
    num_heads: int
    num_kv_heads: int  # gqa: key/value heads (num_heads for multi-head attention)
    head_dim: int  # gqa
    qk_layernorm: bool  # gqa: per-head q/k norms; mla: the latent norms q_norm and kv_norm
    q_lora_rank: Optional[int]  # mla: None means a plain query projection
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    dropout: float
    cp_comm_type: Literal["p2p", "allgather"]  # how context-parallel attention gets the other ranks' keys
    rope_dim: int  # dimensions RoPE rotates per head (the rope part of MLA's query/key)
    rope_base: float
    max_positions: int
    yarn: Optional[YarnScaling]
    position_interpolation: float = 1.0  # positions divided by this before rotation (plain RoPE)


@dataclass(frozen=True)
class MoEArgs:
    """One MoE layer: router, routed experts, shared experts, dispatch."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    shared_ffn_hidden_size: Optional[int]
    score_function: Literal["softmax", "sigmoid"]
    pre_softmax: bool
    num_groups: Optional[int]
    group_topk: Optional[int]
    topk_scaling_factor: Optional[float]
    router_dtype: torch.dtype
    load_balancing: str
    aux_loss_coeff: float
    z_loss_coeff: Optional[float]
    enable_expert_bias: bool
    bias_update_rate: float
    capacity_factor: Optional[float]
    pad_to_capacity: bool
    pad_multiple: int  # each expert's rows padded to a multiple of this (1: no padding)
    fp8_dispatch: bool  # the FP8 layers' rows cross the all-to-all in FP8
    a2a_chunks: int  # token chunks whose all-to-alls overlap the other chunks' experts
    drop_policy: Literal["probs", "position"]
    random_logits: bool  # --moe-router-force-load-balancing
    dispatcher: Literal["allgather", "alltoall"]
    expert_backend: Literal["loop", "torch", "te"]
    shared_expert_overlap: bool
    recompute: bool


@dataclass(frozen=True)
class GPTArgs:
    """The whole model. ``moe_layers`` flags every block, decoder layers then MTP blocks."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    normalization: Normalization
    norm_eps: float
    swiglu: bool
    vocab_size: int
    make_vocab_size_divisible_by: int
    tie_embeddings: bool
    init_method_std: float
    hidden_dropout: float
    mtp_num_layers: int
    recompute: Recompute
    attention: AttentionArgs
    moe: Optional[MoEArgs]
    moe_layers: tuple[bool, ...]

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.mtp_num_layers


def parse_moe_layer_freq(spec: str, num_layers: int) -> list[bool]:
    """Which layers are MoE, from Megatron's --moe-layer-freq: 'N' or a pattern '[0]*1+[1]*3'."""
    flag = f"--moe-layer-freq {spec}"
    try:
        tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{flag}: expected an integer or a list pattern such as '[0]*1+[1]*3'") from None

    def evaluate(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [evaluate(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ConfigError(f"{flag}: only integers, lists, + and * are allowed")

    value = evaluate(tree)
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1")
        return [i % value == 0 for i in range(num_layers)]
    if len(value) != num_layers or any(v not in (0, 1) for v in value):
        raise ConfigError(f"{flag}: the pattern must hold one 0 or 1 per layer ({num_layers} from --num-layers)")
    return [bool(v) for v in value]


def dense_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default MLP width: 4h, or for SwiGLU 2/3 of that rounded down to 64."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


def num_kv_heads(m: ModelConfig) -> int:
    """Key/value heads: --num-query-groups (default 1) with --group-query-attention, else one
    per attention head, as Megatron-LM reads them."""
    if not m.group_query_attention:
        return m.num_attention_heads
    return m.num_query_groups if m.num_query_groups is not None else 1


def attention_args(config: Config) -> AttentionArgs:
    m = config.model
    mla = m.multi_latent_attention
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    rope_type = m.rope_type or ("yarn" if mla else "rope")
    yarn = None
    if rope_type == "yarn":
        yarn = YarnScaling(m.rotary_scaling_factor, m.original_max_position_embeddings,
                           m.beta_fast, m.beta_slow, m.mscale, m.mscale_all_dim)
    return AttentionArgs(
        kind="mla" if mla else "gqa", num_heads=m.num_attention_heads, num_kv_heads=num_kv_heads(m),
        head_dim=head_dim, qk_layernorm=m.qk_layernorm, q_lora_rank=m.q_lora_rank or None,
        kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim, dropout=m.attention_dropout, cp_comm_type=config.parallel.cp_comm_type,
        rope_dim=m.qk_pos_emb_head_dim if mla else head_dim, rope_base=m.rotary_base,
        max_positions=m.max_position_embeddings or m.seq_length, yarn=yarn,
        position_interpolation=m.rotary_seq_len_interpolation_factor or 1.0)


def _pad_multiple(config: Config) -> int:
    """Rows per expert padded to the FP8 GEMM alignment with --moe-router-padding-for-fp8, and
    always for TE's FP8 grouped GEMMs, which need it."""
    te_fp8 = config.model.fp8_format is not None and config.moe.expert_backend == "te"
    return FP8_ALIGNMENT if config.moe.moe_router_padding_for_fp8 or te_fp8 else 1


def moe_args(config: Config, dense_ffn: int) -> Optional[MoEArgs]:
    """None for a dense model (--num-experts unset or 0)."""
    moe = config.moe
    if not moe.num_experts:
        return None
    return MoEArgs(
        num_experts=moe.num_experts, topk=moe.moe_router_topk,
        ffn_hidden_size=moe.moe_ffn_hidden_size or dense_ffn,
        shared_ffn_hidden_size=moe.moe_shared_expert_intermediate_size or None,
        score_function=moe.moe_router_score_function,
        pre_softmax=moe.moe_router_pre_softmax and moe.moe_router_score_function == "softmax",
        num_groups=moe.moe_router_num_groups, group_topk=moe.moe_router_group_topk,
        topk_scaling_factor=moe.moe_router_topk_scaling_factor, router_dtype=_ROUTER_DTYPES[moe.moe_router_dtype],
        load_balancing=moe.moe_router_load_balancing_type, aux_loss_coeff=moe.moe_aux_loss_coeff,
        z_loss_coeff=moe.moe_z_loss_coeff, enable_expert_bias=moe.moe_router_enable_expert_bias,
        bias_update_rate=moe.moe_router_bias_update_rate, capacity_factor=moe.moe_expert_capacity_factor,
        pad_to_capacity=moe.moe_pad_expert_input_to_capacity, pad_multiple=_pad_multiple(config),
        fp8_dispatch=moe.moe_fp8_dispatch, a2a_chunks=moe.moe_a2a_overlap_chunks,
        drop_policy=moe.moe_token_drop_policy, random_logits=moe.moe_router_force_load_balancing,
        dispatcher=moe.moe_token_dispatcher_type, expert_backend=moe.expert_backend,
        shared_expert_overlap=moe.moe_shared_expert_overlap, recompute=Recompute.of(config.model, moe).moe)


def gpt_args(config: Config) -> GPTArgs:
    """The model a (validated) config describes."""
    m = config.model
    ffn = m.ffn_hidden_size or dense_ffn_hidden_size(m.hidden_size, m.swiglu)
    moe = moe_args(config, ffn)
    is_moe = parse_moe_layer_freq(config.moe.moe_layer_freq, m.num_layers) if moe else [False] * m.num_layers
    # MTP blocks use the FFN kind of the last decoder layer (MoE in DeepSeek-V3).
    is_moe = is_moe + [is_moe[-1]] * m.mtp_num_layers
    return GPTArgs(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn, normalization=m.normalization,
        norm_eps=m.norm_epsilon, swiglu=m.swiglu, vocab_size=config.data.model_vocab_size or config.data.vocab_size,
        make_vocab_size_divisible_by=config.data.make_vocab_size_divisible_by,
        tie_embeddings=not m.untie_embeddings_and_output_weights, init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout, mtp_num_layers=m.mtp_num_layers,
        recompute=Recompute.of(m, config.moe), attention=attention_args(config), moe=moe,
        moe_layers=tuple(is_moe))
