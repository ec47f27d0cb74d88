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

from megamoe.model.args import AttentionArgs, GPTArgs, Recompute


def _attention_macs_per_token(a: AttentionArgs, hidden: int, seq_length: int) -> float:
    s, H = seq_length, a.num_heads
    if a.kind == "mla":
        qk = a.qk_head_dim + a.qk_pos_emb_head_dim
        q = hidden * a.q_lora_rank + a.q_lora_rank * H * qk if a.q_lora_rank else hidden * H * qk
        proj = q + hidden * (a.kv_lora_rank + a.qk_pos_emb_head_dim) \
            + a.kv_lora_rank * H * (a.qk_head_dim + a.v_head_dim) + H * a.v_head_dim * hidden
        core = (s / 2) * H * (qk + a.v_head_dim)
    else:
        proj = hidden * a.head_dim * (2 * H + 2 * a.num_kv_heads)
        core = (s / 2) * H * 2 * a.head_dim
    return proj + core


def _ffn_macs_per_token(args: GPTArgs, moe_layer: bool) -> float:
    matrices = 3 if args.swiglu else 2  # SwiGLU: w1, w3, w2; GeLU: w1, w2
    if not moe_layer:
        return matrices * args.hidden_size * args.ffn_hidden_size
    moe = args.moe
    routed = moe.topk * matrices * args.hidden_size * moe.ffn_hidden_size
    shared = matrices * args.hidden_size * (moe.shared_ffn_hidden_size or 0)
    return args.hidden_size * moe.num_experts + routed + shared


def flops_per_token(args: GPTArgs, seq_length: int, padded_vocab: int) -> float:
    """Training (forward + backward) model FLOPs per token."""
    h = args.hidden_size
    attention = _attention_macs_per_token(args.attention, h, seq_length)
    head = h * padded_vocab
    decoder = args.moe_layers[: args.num_layers]
    macs = head + sum(attention + _ffn_macs_per_token(args, x) for x in decoder)
    mtp_block = attention + _ffn_macs_per_token(args, decoder[-1])
    macs += args.mtp_num_layers * (2 * h * h + mtp_block + head)
    return 3 * 2 * macs


def recomputed_flops_per_token(args: GPTArgs, seq_length: int, recompute: Recompute = Recompute()) -> float:
    """FLOPs per token that recomputation adds to a training step (not model FLOPs): a second
    forward of every block (full), or of what ``recompute`` names: the attention core, the MoE
    layers' FFN, the dense MLPs, the shared experts."""
    h = args.hidden_size
    attention = _attention_macs_per_token(args.attention, h, seq_length)
    blocks = list(args.moe_layers)  # decoder layers, then MTP blocks
    if recompute.full:
        return 2 * sum(attention + _ffn_macs_per_token(args, x) for x in blocks)
    macs = 0.0
    if recompute.core_attn:
        macs += len(blocks) * (attention - _attention_macs_per_token(args.attention, h, 0))
    if recompute.moe and args.moe is not None:
        macs += sum(_ffn_macs_per_token(args, True) for x in blocks if x)
    if recompute.mlp_alone:
        macs += sum(_ffn_macs_per_token(args, False) for x in blocks if not x)
    if recompute.shared_experts_alone and args.moe is not None:
        matrices = 3 if args.swiglu else 2
        macs += sum(1 for x in blocks if x) * matrices * h * (args.moe.shared_ffn_hidden_size or 0)
    return 2 * macs


# Dense bf16 peak of the GPUs we know (vendor datasheets); MFU is printed only for these.
PEAK_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "H800": 989.5, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None
