"""Model FLOPs per token: the one formula behind TFLOP/s and MFU in the logs.

Counted: every matrix multiply a token passes through (2 FLOPs per multiply-add) plus the
attention core with a causal mask (each query attends to s/2 keys on average), for the
forward pass, times 3 for forward + backward. Not counted: norms, activations, softmax,
the embedding lookup, recomputation (so MFU is model FLOPs utilisation, as in PaLM).
Padded vocabulary rows are counted, as they are computed.

For the 4-layer DeepSeek-V2-Lite proxy in shared/gpu/README.md (seq 4096) this gives
3.49e9 FLOPs per token, the figure quoted there for Megatron-Core.
"""

from __future__ import annotations

from megamoe.config import Config
from megamoe.config_validation import parse_moe_layer_freq


def _attention_macs_per_token(config: Config) -> float:
    m = config.model
    s, H = m.seq_length, m.num_attention_heads
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        q = m.hidden_size * m.q_lora_rank + m.q_lora_rank * H * qk if m.q_lora_rank else m.hidden_size * H * qk
        proj = q + m.hidden_size * (m.kv_lora_rank + m.qk_pos_emb_head_dim) \
            + m.kv_lora_rank * H * (m.qk_head_dim + m.v_head_dim) + H * m.v_head_dim * m.hidden_size
        core = (s / 2) * H * (qk + m.v_head_dim)
    else:
        hd = m.kv_channels or m.hidden_size // H
        kv = m.num_query_groups or H
        proj = m.hidden_size * hd * (2 * H + 2 * kv)
        core = (s / 2) * H * 2 * hd
    return proj + core


def _ffn_macs_per_token(config: Config, moe_layer: bool) -> float:
    m, moe = config.model, config.moe
    if not moe_layer:
        return 3 * m.hidden_size * m.ffn_hidden_size
    ffn = moe.moe_ffn_hidden_size or m.ffn_hidden_size
    routed = moe.moe_router_topk * 3 * m.hidden_size * ffn
    shared = 3 * m.hidden_size * (moe.moe_shared_expert_intermediate_size or 0)
    return m.hidden_size * moe.num_experts + routed + shared


def flops_per_token(config: Config, padded_vocab: int) -> float:
    """Training (forward + backward) model FLOPs per token."""
    m, moe = config.model, config.moe
    is_moe = parse_moe_layer_freq(moe.moe_layer_freq, m.num_layers) if moe.num_experts else [False] * m.num_layers
    head = m.hidden_size * padded_vocab
    macs = head + sum(_attention_macs_per_token(config) + _ffn_macs_per_token(config, x) for x in is_moe)
    mtp_block = _attention_macs_per_token(config) + _ffn_macs_per_token(config, is_moe[-1])
    macs += m.mtp_num_layers * (2 * m.hidden_size * m.hidden_size + mtp_block + head)
    return 3 * 2 * macs


# Dense bf16 peak of the GPUs we know (vendor datasheets); MFU is printed only for these.
PEAK_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None
