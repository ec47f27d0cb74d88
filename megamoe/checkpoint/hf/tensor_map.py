"""Which HF tensor is which piece of which megamoe tensor, per family.

A :class:`TensorMap` places one HF tensor in a megamoe global tensor (the single-process
model's, as checkpoints store them) at ``offsets``. Most maps are whole tensors. The routed
experts are stacked in megamoe (``w13`` [E, 2F, D]: gate rows then up rows; ``w2`` [E, D, F])
and separate per expert in HF, so each HF expert tensor is a box of the stacked one: one
piece of a DCP checkpoint, written and read without assembling the stack.

RoPE conventions. megamoe rotates interleaved pairs (dimensions 2i and 2i+1), as DeepSeek's
code does; Mixtral and Qwen3 rotate the half-split pairs (i and i + d/2). Attention logits
are dot products of rotated queries and keys, so permuting the rotated rows of the query and
key projections the same way in every head converts one convention into the other exactly;
Qwen3's per-head q/k norm weights are permuted with them (an RMS over a head is indifferent
to the order). :class:`RopeRows` says which rows are rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.model.args import GPTArgs


@dataclass(frozen=True)
class RopeRows:
    """Rows of a weight that RoPE rotates, half-split in HF: every block of ``block`` rows
    holds ``dim`` rotated rows starting at ``offset`` (one block per head)."""

    block: int
    offset: int
    dim: int

    def interleaving(self, rows: int) -> torch.Tensor:
        """``perm`` with ``interleaved = half_split[perm]`` along the rows."""
        perm = torch.arange(rows)
        half = self.dim // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
        for start in range(0, rows, self.block):
            lo = start + self.offset
            perm[lo:lo + self.dim] = lo + pairs
        return perm


def to_interleaved(t: torch.Tensor, rope: Optional[RopeRows]) -> torch.Tensor:
    return t if rope is None else t[rope.interleaving(t.shape[0])]


def to_half_split(t: torch.Tensor, rope: Optional[RopeRows]) -> torch.Tensor:
    return t if rope is None else t[torch.argsort(rope.interleaving(t.shape[0]))]


@dataclass(frozen=True)
class TensorMap:
    """HF tensor ``hf`` (of ``shape``) is ``model/<name>[offsets : offsets + shape]`` of a
    megamoe tensor of ``global_shape`` (leading dimensions of size one where the HF tensor has
    fewer: one expert of a stack)."""

    hf: str
    name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    rope: Optional[RopeRows] = None
    export_only: bool = False  # a copy HF stores twice (DeepSeek's MTP embedding and head)
    zeros_if_absent: bool = False  # HF always has it; a megamoe model without it means zeros

    @property
    def keeps_float32(self) -> bool:
        """The router's expert bias: a float32 buffer in every precision, and float32 in HF."""
        return self.name.endswith("gate.bias")

    @property
    def fqn(self) -> str:
        return "model/" + self.name

    @property
    def box(self) -> tuple[int, ...]:
        return (1,) * (len(self.global_shape) - len(self.shape)) + self.shape


def _whole(hf: str, name: str, shape: tuple[int, ...], rope: Optional[RopeRows] = None, **kw) -> TensorMap:
    return TensorMap(hf, name, shape, (0,) * len(shape), shape, rope, **kw)


def _attention(hf: str, mm: str, gpt: GPTArgs, half_split_rope: bool) -> list[TensorMap]:
    a, D = gpt.attention, gpt.hidden_size
    if a.kind == "gqa":
        hd = a.head_dim
        rope = RopeRows(hd, 0, hd) if half_split_rope else None
        maps = [_whole(f"{hf}.q_proj.weight", f"{mm}.wq.weight", (a.num_heads * hd, D), rope),
                _whole(f"{hf}.k_proj.weight", f"{mm}.wk.weight", (a.num_kv_heads * hd, D), rope),
                _whole(f"{hf}.v_proj.weight", f"{mm}.wv.weight", (a.num_kv_heads * hd, D)),
                _whole(f"{hf}.o_proj.weight", f"{mm}.wo.weight", (D, a.num_heads * hd))]
        if a.qk_layernorm:
            maps += [_whole(f"{hf}.q_norm.weight", f"{mm}.q_norm.weight", (hd,), rope),
                     _whole(f"{hf}.k_norm.weight", f"{mm}.k_norm.weight", (hd,), rope)]
        return maps
    qk = a.qk_head_dim + a.qk_pos_emb_head_dim
    q_rope = RopeRows(qk, a.qk_head_dim, a.qk_pos_emb_head_dim) if half_split_rope else None
    kv_a = a.kv_lora_rank + a.qk_pos_emb_head_dim
    k_rope = RopeRows(kv_a, a.kv_lora_rank, a.qk_pos_emb_head_dim) if half_split_rope else None
    if a.q_lora_rank:
        maps = [_whole(f"{hf}.q_a_proj.weight", f"{mm}.wq_a.weight", (a.q_lora_rank, D)),
                _whole(f"{hf}.q_a_layernorm.weight", f"{mm}.q_norm.weight", (a.q_lora_rank,)),
                _whole(f"{hf}.q_b_proj.weight", f"{mm}.wq_b.weight", (a.num_heads * qk, a.q_lora_rank), q_rope)]
    else:
        maps = [_whole(f"{hf}.q_proj.weight", f"{mm}.wq.weight", (a.num_heads * qk, D), q_rope)]
    return maps + [
        _whole(f"{hf}.kv_a_proj_with_mqa.weight", f"{mm}.wkv_a.weight", (kv_a, D), k_rope),
        _whole(f"{hf}.kv_a_layernorm.weight", f"{mm}.kv_norm.weight", (a.kv_lora_rank,)),
        _whole(f"{hf}.kv_b_proj.weight", f"{mm}.wkv_b.weight",
               (a.num_heads * (a.qk_head_dim + a.v_head_dim), a.kv_lora_rank)),
        _whole(f"{hf}.o_proj.weight", f"{mm}.wo.weight", (D, a.num_heads * a.v_head_dim))]


def _mlp(hf: str, mm: str, D: int, F: int, names=("gate_proj", "up_proj", "down_proj")) -> list[TensorMap]:
    gate, up, down = names
    return [_whole(f"{hf}.{gate}.weight", f"{mm}.w1.weight", (F, D)),
            _whole(f"{hf}.{up}.weight", f"{mm}.w3.weight", (F, D)),
            _whole(f"{hf}.{down}.weight", f"{mm}.w2.weight", (D, F))]


def _moe(hf: str, mm: str, gpt: GPTArgs, family: str) -> list[TensorMap]:
    moe, D = gpt.moe, gpt.hidden_size
    E, F = moe.num_experts, moe.ffn_hidden_size
    maps = [_whole(f"{hf}.gate.weight", f"{mm}.gate.weight", (E, D))]
    if family == "deepseek_v3":
        maps.append(_whole(f"{hf}.gate.e_score_correction_bias", f"{mm}.gate.bias", (E,),
                           zeros_if_absent=not moe.enable_expert_bias))
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    w13, w2 = (E, 2 * F, D), (E, D, F)
    for e in range(E):
        x = f"{hf}.experts.{e}"
        maps += [TensorMap(f"{x}.{gate}.weight", f"{mm}.experts.w13", w13, (e, 0, 0), (F, D)),
                 TensorMap(f"{x}.{up}.weight", f"{mm}.experts.w13", w13, (e, F, 0), (F, D)),
                 TensorMap(f"{x}.{down}.weight", f"{mm}.experts.w2", w2, (e, 0, 0), (D, F))]
    if moe.shared_ffn_hidden_size:
        maps += _mlp(f"{hf}.shared_experts", f"{mm}.shared_experts", D, moe.shared_ffn_hidden_size)
    return maps


def _block(hf: str, mm: str, gpt: GPTArgs, family: str, moe_layer: bool, half_split_rope: bool) -> list[TensorMap]:
    D = gpt.hidden_size
    maps = [_whole(f"{hf}.input_layernorm.weight", f"{mm}.attn_norm.weight", (D,)),
            _whole(f"{hf}.post_attention_layernorm.weight", f"{mm}.ffn_norm.weight", (D,))]
    maps += _attention(f"{hf}.self_attn", f"{mm}.attn", gpt, half_split_rope)
    ffn = "block_sparse_moe" if family == "mixtral" else "mlp"
    if moe_layer:
        maps += _moe(f"{hf}.{ffn}", f"{mm}.ffn", gpt, family)
    else:
        maps += _mlp(f"{hf}.mlp", f"{mm}.ffn", D, gpt.ffn_hidden_size)
    return maps


def tensor_maps(gpt: GPTArgs, family: str, half_split_rope: bool) -> list[TensorMap]:
    """Every tensor of an HF checkpoint of ``family`` for the model ``gpt``, in HF's order.
    ``half_split_rope``: the HF weights rotate half-split pairs (Mixtral, Qwen3, DeepSeek-V3
    with ``rope_interleave: false``)."""
    D, V = gpt.hidden_size, gpt.vocab_size
    maps = [_whole("model.embed_tokens.weight", "embed.weight", (V, D))]
    for i in range(gpt.num_layers):
        maps += _block(f"model.layers.{i}", f"layers.{i}", gpt, family, gpt.moe_layers[i], half_split_rope)
    maps.append(_whole("model.norm.weight", "norm.weight", (D,)))
    head = "embed.weight" if gpt.tie_embeddings else "head.weight"
    if not gpt.tie_embeddings:
        maps.append(_whole("lm_head.weight", head, (V, D)))
    for k in range(gpt.mtp_num_layers):  # DeepSeek-V3 stores MTP depth k as decoder layer L + k
        hf, mm = f"model.layers.{gpt.num_layers + k}", f"mtp.{k}"
        maps += [_whole(f"{hf}.enorm.weight", f"{mm}.enorm.weight", (D,)),
                 _whole(f"{hf}.hnorm.weight", f"{mm}.hnorm.weight", (D,)),
                 _whole(f"{hf}.eh_proj.weight", f"{mm}.eh_proj.weight", (D, 2 * D)),
                 _whole(f"{hf}.shared_head.norm.weight", f"{mm}.norm.weight", (D,)),
                 _whole(f"{hf}.embed_tokens.weight", "embed.weight", (V, D), export_only=True),
                 _whole(f"{hf}.shared_head.head.weight", head, (V, D), export_only=True)]
        maps += _block(hf, f"{mm}.block", gpt, family, gpt.moe_layers[gpt.num_layers + k], half_split_rope)
    return maps


def is_mtp_tensor(name: str, num_layers: int) -> bool:
    """Whether an HF tensor belongs to a DeepSeek-V3 MTP layer (layer index >= num_layers)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers
