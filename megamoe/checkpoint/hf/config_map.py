"""Hugging Face ``config.json`` <-> megamoe's flags, per model family.

Families (``FAMILIES``) and the HF ``model_type`` values read as each:

- ``deepseek_v2``: DeepSeek-V2 and V2-Lite (MLA, softmax router, greedy or group-limited);
- ``deepseek_v3``: DeepSeek-V3 and Kimi K2 (``kimi_k2``; the same architecture, larger):
  MLA, sigmoid router with the correction bias, expert groups, MTP layers;
- ``mixtral``: GQA, softmax top-k router renormalised over the chosen experts;
- ``qwen3_moe``: GQA with per-head QK-norm, softmax router, optional renormalisation.

Every HF option megamoe cannot express is refused with a message naming it, never dropped: a
converted model computes what the published one computes, or the conversion stops. Options that
are training choices rather than the model (the balancing loss and its coefficient) get the
family's published values, which the written YAML states and a user may change.
"""

from __future__ import annotations

from typing import Any

from megamoe.config import Config, ConfigError

FAMILIES = ("deepseek_v2", "deepseek_v3", "mixtral", "qwen3_moe")
MODEL_TYPES = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
               "mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# The balancing each family was published with (a training choice: the YAML says so).
_BALANCING = {"deepseek_v2": ("aux_loss", 0.003), "deepseek_v3": ("seq_aux_loss", 1e-4),
              "mixtral": ("aux_loss", 0.02), "qwen3_moe": ("global_aux_loss", 1e-3)}
DEFAULT_SEQ_LENGTH = 4096


class ConversionError(ConfigError):
    """A checkpoint or config that cannot be converted faithfully (one line, naming the cause)."""


def family_of(hf: dict) -> str:
    """The family of an HF config, from its ``model_type``."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {model_type!r} is not supported (supported: "
                              f"{', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[model_type]


def _get(hf: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in ``hf`` (HF renamed several fields across versions)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _require(hf: dict, *names: str) -> Any:
    value = _get(hf, *names)
    if value is None:
        raise ConversionError(f"config.json: {names[0]} is missing")
    return value


def _refuse_unless(ok: bool, what: str) -> None:
    if not ok:
        raise ConversionError(f"config.json: {what}; megamoe cannot build this model, so it is not converted")


def rope_parameters(hf: dict) -> dict:
    """The RoPE settings in one form: transformers 5's ``rope_parameters``, or the published
    checkpoints' ``rope_theta`` plus ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if v is not None})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _rope_values(hf: dict, mla: bool) -> dict:
    rope = rope_parameters(hf)
    theta = float(rope["rope_theta"])
    _refuse_unless(theta == int(theta), f"rope_theta {theta} is not an integer (--rotary-base is)")
    _refuse_unless(rope.get("partial_rotary_factor", 1.0) == 1.0, "partial_rotary_factor is not 1")
    values: dict[str, Any] = {"rotary_base": int(theta)}
    kind = rope["rope_type"]
    if kind == "default":
        values["rope_type"] = "rope"
        return values
    if kind == "linear":  # positions divided by the factor: --rotary-seq-len-interpolation-factor
        values.update(rope_type="rope", rotary_seq_len_interpolation_factor=float(rope["factor"]))
        return values
    _refuse_unless(kind == "yarn", f"rope type {kind!r} (megamoe has plain RoPE, linear interpolation and YaRN)")
    _refuse_unless(rope.get("attention_factor") is None, "yarn attention_factor is set explicitly")
    _refuse_unless(rope.get("truncate", True), "yarn truncate is false")
    original = rope.get("original_max_position_embeddings")
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # transformers then scales the tables by mscale(factor, 1)
        mscale, mscale_all_dim = 1.0, 0.0
    _refuse_unless(mla or not mscale_all_dim, "yarn mscale_all_dim on a non-MLA model")
    values.update(rope_type="yarn", rotary_scaling_factor=float(factor), original_max_position_embeddings=int(original),
                  beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                  mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    return values


def _common_values(hf: dict, family: str) -> dict:
    _refuse_unless(_get(hf, "hidden_act", default="silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} (SwiGLU needs silu)")
    _refuse_unless(not hf.get("attention_bias") and not hf.get("mlp_bias"), "linear layers have biases")
    # Qwen3 configs carry a sliding_window that only use_sliding_window turns on
    window = hf.get("use_sliding_window") if family == "qwen3_moe" else hf.get("sliding_window")
    _refuse_unless(not window, "sliding-window attention is on")
    max_positions = int(_require(hf, "max_position_embeddings"))
    return {
        "num_layers": int(_require(hf, "num_hidden_layers")), "hidden_size": int(_require(hf, "hidden_size")),
        "ffn_hidden_size": int(_require(hf, "intermediate_size")),
        "num_attention_heads": int(_require(hf, "num_attention_heads")),
        "normalization": "RMSNorm", "norm_epsilon": float(_get(hf, "rms_norm_eps", default=1e-6)), "swiglu": True,
        "add_bias_linear": False, "position_embedding_type": "rope", "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
        "init_method_std": float(_get(hf, "initializer_range", default=0.02)),
        "max_position_embeddings": max_positions, "seq_length": min(max_positions, DEFAULT_SEQ_LENGTH),
        "vocab_size": int(_require(hf, "vocab_size")), "model_vocab_size": int(_require(hf, "vocab_size")),
    }


def _moe_layer_pattern(flags: list[bool]) -> str:
    return "[" + ",".join("1" if f else "0" for f in flags) + "]"


def _deepseek_values(hf: dict, family: str, mtp_num_layers: int) -> dict:
    num_layers = int(hf["num_hidden_layers"])
    first_dense = int(_get(hf, "first_k_dense_replace", default=0))
    freq = int(_get(hf, "moe_layer_freq", default=1))
    num_experts = int(_require(hf, "n_routed_experts", "num_local_experts"))
    moe_layers = [i >= first_dense and i % freq == 0 for i in range(num_layers)]
    q_lora = hf.get("q_lora_rank")
    values = {
        "multi_latent_attention": True, "qk_layernorm": True, "q_lora_rank": int(q_lora) if q_lora else 0,
        "kv_lora_rank": int(hf["kv_lora_rank"]), "qk_head_dim": int(hf["qk_nope_head_dim"]),
        "qk_pos_emb_head_dim": int(hf["qk_rope_head_dim"]), "v_head_dim": int(hf["v_head_dim"]),
        "num_experts": num_experts, "moe_router_topk": int(hf["num_experts_per_tok"]),
        "moe_ffn_hidden_size": int(hf["moe_intermediate_size"]), "moe_layer_freq": _moe_layer_pattern(moe_layers),
    }
    _refuse_unless(int(_get(hf, "num_key_value_heads", default=hf["num_attention_heads"])) == hf["num_attention_heads"],
                   "MLA with num_key_value_heads != num_attention_heads")
    shared = int(_get(hf, "n_shared_experts", default=0))
    values["moe_shared_expert_intermediate_size"] = shared * values["moe_ffn_hidden_size"] if shared else None
    scaling = float(_get(hf, "routed_scaling_factor", default=1.0))
    values["moe_router_topk_scaling_factor"] = scaling if scaling != 1.0 else None
    groups, group_topk = hf.get("n_group"), hf.get("topk_group")
    if family == "deepseek_v2":
        method = _get(hf, "topk_method", default="greedy")
        _refuse_unless(method in ("greedy", "group_limited_greedy"), f"topk_method {method!r}")
        # transformers' DeepseekV2 never renormalises the chosen experts' softmax probabilities
        _refuse_unless(not hf.get("norm_topk_prob"), "norm_topk_prob is true for deepseek_v2 (transformers ignores it)")
        values.update(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                      moe_router_enable_expert_bias=False)
        if method == "group_limited_greedy":
            values.update(moe_router_num_groups=int(groups), moe_router_group_topk=int(group_topk))
    else:
        method = _get(hf, "topk_method", default="noaux_tc")
        _refuse_unless(method == "noaux_tc", f"topk_method {method!r} (deepseek_v3 routes with noaux_tc)")
        _refuse_unless(_get(hf, "scoring_func", default="sigmoid") == "sigmoid", "scoring_func is not sigmoid")
        _refuse_unless(bool(_get(hf, "norm_topk_prob", default=True)) or values["moe_router_topk"] == 1,
                       "norm_topk_prob is false with the sigmoid router (megamoe, like Megatron-LM, "
                       "always normalises sigmoid top-k probabilities)")
        values.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
        if groups and int(groups) > 1:
            values.update(moe_router_num_groups=int(groups), moe_router_group_topk=int(group_topk))
        values["rope_interleave"] = bool(_get(hf, "rope_interleave", default=True))
        available = int(_get(hf, "num_nextn_predict_layers", default=0))
        if mtp_num_layers > available:
            raise ConversionError(f"--mtp-num-layers {mtp_num_layers}: the checkpoint has {available} MTP layers "
                                  "(num_nextn_predict_layers)")
        values["mtp_num_layers"] = mtp_num_layers
    return values


def _gqa_values(hf: dict, family: str) -> dict:
    heads = int(hf["num_attention_heads"])
    head_dim = int(_get(hf, "head_dim", default=int(hf["hidden_size"]) // heads))
    num_layers = int(hf["num_hidden_layers"])
    values = {
        "multi_latent_attention": False, "group_query_attention": True,
        "num_query_groups": int(_get(hf, "num_key_value_heads", default=heads)), "kv_channels": head_dim,
        "qk_layernorm": family == "qwen3_moe",
        "num_experts": int(_require(hf, "num_local_experts", "num_experts")),
        "moe_router_topk": int(hf["num_experts_per_tok"]), "moe_router_score_function": "softmax",
        "moe_shared_expert_intermediate_size": None, "moe_router_enable_expert_bias": False,
    }
    if family == "mixtral":
        values["moe_ffn_hidden_size"] = int(hf["intermediate_size"])
        moe_layers = [True] * num_layers
    else:
        values["moe_ffn_hidden_size"] = int(hf["moe_intermediate_size"])
        values["moe_router_pre_softmax"] = not hf.get("norm_topk_prob", False)
        dense = set(hf.get("mlp_only_layers") or [])
        step = int(_get(hf, "decoder_sparse_step", default=1))
        moe_layers = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    values["moe_layer_freq"] = _moe_layer_pattern(moe_layers)
    return values


def megamoe_values(hf: dict, mtp_num_layers: int = 0) -> tuple[str, dict]:
    """(family, megamoe field values) for an HF config; raises ConversionError for a model
    megamoe would compute differently."""
    family = family_of(hf)
    values = _common_values(hf, family)
    values.update(_rope_values(hf, mla=family.startswith("deepseek")))
    if family.startswith("deepseek"):
        values.update(_deepseek_values(hf, family, mtp_num_layers))
    else:
        if mtp_num_layers:
            raise ConversionError(f"--mtp-num-layers {mtp_num_layers}: {family} checkpoints have no MTP layers")
        values.update(_gqa_values(hf, family))
    balancing, coeff = _BALANCING[family]
    values.update(moe_grouped_gemm=True, moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=coeff)
    return family, values


# ---------------------------------------------------------------------------------------------
# megamoe -> HF


def family_of_config(config: Config) -> str:
    """Which HF family a megamoe model is: MLA with a sigmoid router is DeepSeek-V3, MLA with
    softmax DeepSeek-V2, GQA with QK-norm Qwen3-MoE, GQA without Mixtral."""
    m, moe = config.model, config.moe
    if not moe.num_experts:
        raise ConversionError("the checkpoint is a dense model (no --num-experts); the HF families are MoE")
    if m.multi_latent_attention:
        return "deepseek_v3" if moe.moe_router_score_function == "sigmoid" else "deepseek_v2"
    return "qwen3_moe" if m.qk_layernorm else "mixtral"


def _export_refusals(config: Config, family: str, moe_layers: list[bool]) -> None:
    m, moe = config.model, config.moe

    def refuse_unless(ok: bool, what: str) -> None:
        if not ok:
            raise ConversionError(f"{what}: {family} in transformers cannot express it, so it is not exported")

    refuse_unless(m.normalization == "RMSNorm" and m.swiglu, "the model is not RMSNorm + SwiGLU")
    refuse_unless(not m.add_bias_linear, "--add-bias-linear")
    refuse_unless(m.rotary_percent == 1.0, f"--rotary-percent {m.rotary_percent}")
    refuse_unless(family != "deepseek_v2" or not moe.moe_router_enable_expert_bias,
                  "--moe-router-enable-expert-bias with a softmax router")
    if family == "deepseek_v2":
        refuse_unless(moe.moe_router_pre_softmax, "a softmax router that renormalises the top-k (no --moe-router-pre-softmax)")
    if family in ("mixtral", "qwen3_moe"):
        refuse_unless(moe.moe_router_score_function == "softmax",
                      f"--moe-router-score-function {moe.moe_router_score_function}")
        refuse_unless(not moe.moe_router_enable_expert_bias, "--moe-router-enable-expert-bias")
        refuse_unless(not moe.moe_router_num_groups, "--moe-router-num-groups")
        refuse_unless(not moe.moe_router_topk_scaling_factor, "--moe-router-topk-scaling-factor")
        refuse_unless(not moe.moe_shared_expert_intermediate_size, "shared experts")
    if family == "mixtral":
        refuse_unless(not moe.moe_router_pre_softmax, "--moe-router-pre-softmax")
        refuse_unless(all(moe_layers), "dense layers between the MoE layers")
        refuse_unless(moe.moe_ffn_hidden_size in (None, config.model.ffn_hidden_size),
                      "--moe-ffn-hidden-size differing from --ffn-hidden-size")
    if family.startswith("deepseek"):
        first = moe_layers.index(True) if any(moe_layers) else len(moe_layers)
        refuse_unless(all(moe_layers[first:]), "dense layers after the first MoE layer")
        refuse_unless(m.qk_layernorm, "multi-latent attention without --qk-layernorm (no latent norms)")


def hf_config(config: Config, gpt, family: str) -> dict:
    """The HF ``config.json`` of a megamoe model (``gpt``: its :class:`GPTArgs`)."""
    a, moe = gpt.attention, gpt.moe
    moe_layers = list(gpt.moe_layers[:gpt.num_layers])
    _export_refusals(config, family, moe_layers)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": gpt.vocab_size,
        "hidden_size": gpt.hidden_size, "intermediate_size": gpt.ffn_hidden_size,
        "num_hidden_layers": gpt.num_layers, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads if a.kind == "gqa" else a.num_heads,
        "max_position_embeddings": a.max_positions, "rms_norm_eps": gpt.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": gpt.tie_embeddings, "initializer_range": gpt.init_method_std,
        "attention_bias": False, "attention_dropout": 0.0, "rope_theta": float(a.rope_base),
        "num_experts_per_tok": moe.topk, "torch_dtype": "bfloat16",
    }
    if a.position_interpolation != 1.0:
        hf["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": a.position_interpolation}
    if a.yarn is not None and a.yarn.factor > 1.0:
        y = a.yarn
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": y.factor,
                              "original_max_position_embeddings": y.original_max_position_embeddings,
                              "beta_fast": y.beta_fast, "beta_slow": y.beta_slow}
        if y.mscale_all_dim:
            hf["rope_scaling"].update(mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
        else:
            if y.mscale != 1.0:
                raise ConversionError(f"--mscale {y.mscale} without --mscale-all-dim: transformers' YaRN "
                                      "cannot express it, so it is not exported")
    if family.startswith("deepseek"):
        first = moe_layers.index(True) if any(moe_layers) else gpt.num_layers
        hf.update(q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_head_dim,
                  qk_rope_head_dim=a.qk_pos_emb_head_dim, v_head_dim=a.v_head_dim,
                  n_routed_experts=moe.num_experts, moe_intermediate_size=moe.ffn_hidden_size,
                  n_shared_experts=(moe.shared_ffn_hidden_size // moe.ffn_hidden_size
                                    if moe.shared_ffn_hidden_size else 0),
                  first_k_dense_replace=first, moe_layer_freq=1,
                  routed_scaling_factor=moe.topk_scaling_factor or 1.0,
                  n_group=moe.num_groups or 1, topk_group=moe.group_topk or 1)
        if moe.shared_ffn_hidden_size and moe.shared_ffn_hidden_size % moe.ffn_hidden_size:
            raise ConversionError(f"--moe-shared-expert-intermediate-size {moe.shared_ffn_hidden_size} is not a "
                                  f"multiple of --moe-ffn-hidden-size {moe.ffn_hidden_size}: DeepSeek's "
                                  "n_shared_experts cannot express it")
        if family == "deepseek_v2":
            hf.update(topk_method="group_limited_greedy" if moe.num_groups else "greedy", norm_topk_prob=False,
                      scoring_func="softmax")
        else:
            hf.update(topk_method="noaux_tc", norm_topk_prob=True, scoring_func="sigmoid", rope_interleave=True,
                      num_nextn_predict_layers=gpt.mtp_num_layers)
    else:
        hf.update(head_dim=a.head_dim, sliding_window=None, use_sliding_window=False)
        if family == "mixtral":
            hf.update(num_local_experts=moe.num_experts, router_aux_loss_coef=moe.aux_loss_coeff)
        else:
            hf.update(num_experts=moe.num_experts, moe_intermediate_size=moe.ffn_hidden_size,
                      norm_topk_prob=not moe.pre_softmax, decoder_sparse_step=1,
                      mlp_only_layers=[i for i, f in enumerate(moe_layers) if not f],
                      router_aux_loss_coef=moe.aux_loss_coeff)
    return hf


def values_to_config(values: dict) -> Config:
    """A megamoe Config from field values (``rope_interleave`` is the converter's, not a flag)."""
    from megamoe.cli import config_from_values

    return config_from_values({k: v for k, v in values.items() if k != "rope_interleave"})
