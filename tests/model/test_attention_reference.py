"""MLA and GQA against direct float64 implementations of the published formulas, and RoPE /
YaRN against the complex-number form used in DeepSeek's released code."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.rope import RotaryEmbedding, YarnScaling, inverse_frequencies, yarn_mscale
from megamoe.parallel.state import ParallelState

DT = torch.float64
# float64 everywhere except the rotary cos/sin tables, which are float32 as in training:
# that alone limits agreement to ~1e-8 relative.
TOL = dict(rtol=1e-6, atol=1e-9)


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_complex(x, positions, freqs, scale=1.0):
    """DeepSeek's form: view consecutive pairs as complex numbers and multiply by e^{i p f}."""
    angles = torch.outer(positions.double(), freqs)
    rot = torch.polar(torch.full_like(angles, scale), angles)  # [s, d/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [rot.shape[-1]]
    return torch.view_as_real(xc * rot.view(shape)).flatten(-2)


def causal_attention(q, k, v, scale):
    """Explicit causal softmax attention over [s, heads, d] tensors."""
    s = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("yarn", [None, YarnScaling(4.0, 8, mscale=0.707, mscale_all_dim=0.707)])
def test_mla_matches_deepseek_v2_formulas(q_lora_rank, yarn):
    torch.manual_seed(0)
    D, H, kv_rank, d_nope, d_rope, d_v, S, B = 32, 4, 16, 8, 6, 10, 7, 2
    rope = RotaryEmbedding(d_rope, 64, base=10000.0, yarn=yarn)
    rope.init_weights()
    mla = MultiHeadLatentAttention(D, H, q_lora_rank, kv_rank, d_nope, d_rope, d_v, rope, ParallelState.single().tp,
                                   dtype=DT)
    for i, (name, mod) in enumerate(mla.named_modules()):
        if hasattr(mod, "init_weights") and mod is not mla and mod is not rope:
            mod.init_weights(torch.Generator().manual_seed(i))
    with torch.no_grad():  # non-trivial norm weights
        mla.kv_norm.weight.uniform_(0.5, 1.5)
        if q_lora_rank:
            mla.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(S, B, D, dtype=DT)
    pos = torch.arange(S)
    out = mla(x, pos)

    freqs = inverse_frequencies(d_rope, 10000.0, yarn)
    table_scale = rope.table_scale
    scale = 1 / math.sqrt(d_nope + d_rope)
    if yarn is not None:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    for b in range(B):
        h = x[:, b]
        if q_lora_rank:
            c_q = h @ mla.wq_a.weight.T
            q = rms(c_q, mla.q_norm.weight) @ mla.wq_b.weight.T
        else:
            q = h @ mla.wq.weight.T
        q = q.view(S, H, d_nope + d_rope)
        q_c, q_r = q[..., :d_nope], rope_complex(q[..., d_nope:], pos, freqs, table_scale)
        c_kv, k_r = (h @ mla.wkv_a.weight.T).split([kv_rank, d_rope], -1)
        kv = (rms(c_kv, mla.kv_norm.weight) @ mla.wkv_b.weight.T).view(S, H, d_nope + d_v)
        k_c, v = kv[..., :d_nope], kv[..., d_nope:]
        k_r = rope_complex(k_r.unsqueeze(1), pos, freqs, table_scale).expand(S, H, d_rope)
        o = causal_attention(torch.cat([q_c, q_r], -1), torch.cat([k_c, k_r], -1), v, scale)
        expected = o.reshape(S, H * d_v) @ mla.wo.weight.T
        torch.testing.assert_close(out[:, b], expected, **TOL)


def test_gqa_matches_reference():
    torch.manual_seed(1)
    D, H, KV, hd, S, B = 32, 4, 2, 8, 6, 2
    rope = RotaryEmbedding(hd, 16)
    rope.init_weights()
    attn = GroupedQueryAttention(D, H, KV, hd, rope, ParallelState.single().tp, qk_layernorm=True, dtype=DT)
    for i, (name, mod) in enumerate(attn.named_modules()):
        if hasattr(mod, "init_weights") and mod is not attn and mod is not rope:
            mod.init_weights(torch.Generator().manual_seed(i))
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(S, B, D, dtype=DT)
    pos = torch.arange(S)
    out = attn(x, pos)
    freqs = inverse_frequencies(hd, 10000.0)
    for b in range(B):
        h = x[:, b]
        q = rms((h @ attn.wq.weight.T).view(S, H, hd), attn.q_norm.weight)
        k = rms((h @ attn.wk.weight.T).view(S, KV, hd), attn.k_norm.weight)
        v = (h @ attn.wv.weight.T).view(S, KV, hd)
        q, k = rope_complex(q, pos, freqs), rope_complex(k, pos, freqs)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        o = causal_attention(q, k, v, 1 / math.sqrt(hd))
        torch.testing.assert_close(out[:, b], o.reshape(S, H * hd) @ attn.wo.weight.T, **TOL)


def test_yarn_frequencies_match_deepseek_v3_formula():
    dim, base, factor, orig, beta_fast, beta_slow = 64, 10000.0, 40.0, 4096, 32, 1
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def correction_dim(num_rot):
        return dim * math.log(orig / (num_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    expected = freqs / factor * (1 - smooth) + freqs * smooth
    got = inverse_frequencies(dim, base, YarnScaling(factor, orig, beta_fast, beta_slow))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got[0] == freqs[0] and math.isclose(got[-1].item(), freqs[-1].item() / factor)
    # DeepSeek-V3: softmax scale multiplier with mscale_all_dim = 1.0 and factor 40
    assert math.isclose(yarn_mscale(40.0, 1.0), 0.1 * math.log(40.0) + 1.0)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_rope_rotation_preserves_norm_and_relative_positions():
    rope = RotaryEmbedding(8, 32)
    rope.init_weights()
    q, k = torch.randn(1, 1, 1, 8, dtype=DT), torch.randn(1, 1, 1, 8, dtype=DT)
    dots = [(rope(q, torch.tensor([p + 3])) * rope(k, torch.tensor([p]))).sum() for p in range(5)]
    for d in dots[1:]:
        torch.testing.assert_close(d, dots[0], **TOL)  # depends only on the distance
    torch.testing.assert_close(rope(q, torch.tensor([7])).norm(), q.norm(), **TOL)


def test_rope_position_interpolation_divides_the_positions():
    """--rotary-seq-len-interpolation-factor 4: position 4p rotates as position p does without it
    (by hand: cos and sin of p x base^(-2i/dim))."""
    plain, stretched = RotaryEmbedding(8, 64, 10000.0), RotaryEmbedding(8, 64, 10000.0, interpolation=4.0)
    plain.init_weights()
    stretched.init_weights()
    torch.testing.assert_close(stretched.cos[::4], plain.cos[:16], rtol=0, atol=0)
    torch.testing.assert_close(stretched.sin[::4], plain.sin[:16], rtol=0, atol=0)
    freqs = [10000.0 ** (-2 * i / 8) for i in range(4)]
    by_hand = torch.tensor([[math.cos(1.5 * f) for f in freqs]], dtype=torch.float32)
    torch.testing.assert_close(stretched.cos[6:7], by_hand)
