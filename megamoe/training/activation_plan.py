"""Activation memory per GPU, predicted without running anything: what each layer keeps for its
backward per micro-batch, how many micro-batches the pipeline schedule holds at once, and the
peak they reach on top of the training state (``memory_plan.state_bytes``).

Every figure is itemised from the tensors the code saves for backward, read from this rank's
meta model (its local heads, experts and widths, exactly as training shards them), so tensor,
sequence, context and expert parallelism scale each item where they scale that tensor:

- ``T`` tokens of one micro-batch on this rank: micro-batch x seq-length / CP. Attention's
  projections and the dense MLP see all ``T`` (gathered over TP with sequence parallel); norms
  and the residual stream ``T / TP`` with sequence parallel; a MoE layer routes ``T / TP``
  (each TP rank its own slice) and its experts receive ``K`` rows per routed token (x ETP,
  whose ranks share their rows), whatever EP is.
- every norm keeps a float32 copy of its input (``upcast``) when activations are narrower;
- the attention core keeps q, k, v, its output and a float32 log-sum-exp per head and token
  (flash and cuDNN kernels; torch's CPU kernels also keep the float32 probabilities); with
  ``--cp-comm-type allgather`` k and v cover the whole sequence, on the ring only this rank's
  (MLA: its latent, re-expanded in backward);
- the fused head keeps its float32 weight gradient (vocab/TP x hidden: a constant per
  micro-batch) and input gradient; each MTP depth has its own.

Recompute (:class:`megamoe.model.args.Recompute`): the attention core's drops its log-sum-exp
(its other saved tensors are kept by the projections around it anyway); the MoE layer's keeps
the MoE FFN's normalised input, a dense MLP's the same for its MLP; the shared experts' their
input; ``full`` keeps each layer's input. A forward run as pieces (``--overlap-moe-expert-parallel-comm``)
also holds each block's input, and a MoE block cut at its exchanges the rows in flight, the
residual after attention and the shared experts' output; recompute there rebuilds only what
lies between the exchanges (``_piece_block_bytes``).

Checked against the tensors a forward leaves alive: on the CPU by
``megamoe.testing.live_bytes.LiveBytes`` in several layouts (``tests/training/test_activation_plan.py``),
on one H200 against ``torch.cuda.max_memory_allocated`` (``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from megamoe.config import Config
from megamoe.model.args import Recompute
from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.block import TransformerBlock
from megamoe.model.gpt import GPTModel
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.mlp import MLP
from megamoe.model.moe import MoELayer
from megamoe.parallel.cross_entropy import chunk_tokens
from megamoe.parallel.expert_parallel import AllToAllDispatcher
from megamoe.parallel.pipeline_parallel import build_schedule
from megamoe.parallel.state import ParallelState
from megamoe.precision import PrecisionPolicy
from megamoe.training.train import meta_model

FP32 = 4
LSE = 4  # the attention kernels' log-sum-exp: float32 per head and token
ROUTING_PAIR = 4 + 5 * 8  # per (token, expert) pair: its float32 probability and int64 indices (the router's choice, the sort order, each row's pair, each pair's row, the arrival order)
MASK = 1  # dropout keeps a one-byte mask per element
# a recomputed region keeps the tracker's RNG states (tensor- and expert-parallel streams) to
# replay its dropout: torch's CPU generator state is 5056 bytes, a CUDA one a seed and an offset
RNG_STATES = 2
RNG_STATE_BYTES = {"cpu": 5056, "cuda": 16}


@dataclass(frozen=True)
class Tokens:
    """One micro-batch as this rank sees it."""

    seq: int  # this rank's positions (seq-length / CP)
    batch: int
    seq_kv: int  # positions whose keys and values attention keeps (the whole sequence with CP all-gather)
    tp: int
    sp: bool
    act: int  # bytes per activation element
    cpu: bool = False  # torch's CPU kernels, which keep more (see ``norm`` and ``_core``)

    @property
    def full(self) -> int:
        """Tokens the TP region's projections see."""
        return self.seq * self.batch

    @property
    def stream(self) -> int:
        """Tokens of the residual stream and the norms."""
        return self.full // self.tp if self.sp else self.full

    @property
    def routed(self) -> int:
        """Tokens this rank's router handles (each TP rank routes its own slice)."""
        return self.full // self.tp

    @property
    def rng_states(self) -> int:
        """What one recomputed region keeps to replay its random draws."""
        return RNG_STATES * RNG_STATE_BYTES["cpu" if self.cpu else "cuda"]

    def norm(self, dim: int, tokens: int) -> int:
        """A norm's float32 copy of its input (none for float32 activations; the CPU's composite
        kernel keeps its normalised float32 intermediate too) and its rstd."""
        copies = (1 if self.act < FP32 else 0) + (1 if self.cpu else 0)
        return (copies * FP32 * dim + FP32) * tokens


def _linear_input(t: Tokens, dim: int) -> int:
    """The input a TP region's first projections keep: gathered over TP under sequence
    parallel, else the norm's output itself (the replicated sequence)."""
    return t.act * dim * t.full


def mla_bytes(attn: MultiHeadLatentAttention, d: int, t: Tokens, selective: bool) -> dict[str, int]:
    h, nope, rope, v, r_kv = attn.num_local_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    a, full, stream = t.act, t.full, t.stream
    kv_tokens = t.seq_kv * t.batch
    items = {"attn_norm": t.norm(d, stream) + a * d * stream}  # its output feeds the down-projections
    if hasattr(attn, "wq_b"):
        r_q = attn.wq_b.weight.shape[1]
        if isinstance(attn.q_norm, nn.Identity):
            items["q_latent"] = a * r_q * (full if t.sp else stream)
        else:
            items["q_latent"] = t.norm(r_q, stream) + a * r_q * full
    elif t.sp:
        items["q_proj_input"] = _linear_input(t, d)
    ring = attn.cp is not None and attn.cp_comm_type == "p2p" and attn.cp_exchange == "latent"
    bf16_inputs = _core_keeps_inputs(t, nope + rope, v, ring, selective)
    items["q"] = a * h * (nope + rope) * full if bf16_inputs else 0
    items["kv_latent"] = (0 if isinstance(attn.kv_norm, nn.Identity) else t.norm(r_kv, stream))
    if ring:  # the ring keeps this rank's latent and rotated rope key; k and v are re-expanded
        items["kv_latent"] += a * (r_kv + rope) * full
    else:
        items["kv_latent"] += a * r_kv * kv_tokens
        if bf16_inputs:
            items["kv"] = a * h * (nope + v) * kv_tokens  # wkv_b's output, kept through v
            items["k"] = a * h * (nope + rope) * kv_tokens
    items.update(_core(t, h, nope + rope, v, h, kv_tokens, selective, ring))
    items["rope_tables"] = 2 * 2 * FP32 * (rope // 2) * t.seq  # cos and sin, for q's and for k's rotation
    return items


def gqa_bytes(attn: GroupedQueryAttention, d: int, t: Tokens, selective: bool) -> dict[str, int]:
    hq, hkv, hd = attn.num_local_heads, attn.num_local_kv, attn.head_dim
    a, full = t.act, t.full
    ring = attn.cp is not None and attn.cp.size > 1 and attn.cp_comm_type == "p2p"
    kv_tokens = full if ring else t.seq_kv * t.batch
    items = {"attn_norm": t.norm(d, t.stream), "qkv_input": _linear_input(t, d)}
    if _core_keeps_inputs(t, hd, hd, ring, selective):
        items["q"] = a * hq * hd * full
        items["kv"] = 2 * a * hkv * hd * kv_tokens
    if attn.q_norm is not None:
        items["qk_norm"] = t.norm(hd, hq * full) + t.norm(hd, hkv * full)
    items.update(_core(t, hq, hd, hd, hkv, kv_tokens, selective, ring))
    items["rope_tables"] = 2 * 2 * FP32 * (hd // 2) * t.seq
    return items


def _core_keeps_inputs(t: Tokens, qk_dim: int, v_dim: int, ring: bool, selective: bool) -> bool:
    """Whether q, k and v stay alive in the activations' dtype: kept by flash, cuDNN and the ring,
    and by selective recompute's checkpoint. On the CPU torch runs its flash kernel only where
    values have the queries' head size; otherwise its math kernel keeps float32 copies instead."""
    return not (t.cpu and qk_dim != v_dim) or ring or selective


def _core(t: Tokens, heads: int, qk_dim: int, v_dim: int, kv_heads: int, kv_tokens: int,
          selective: bool, ring: bool) -> dict[str, int]:
    """The attention core's output (also the output projection's input) and what the kernel keeps
    besides its inputs: flash, cuDNN and the ring a float32 log-sum-exp per head and token;
    torch's CPU math kernel float32 copies of q, k and v and the float32 probabilities."""
    items = {"core_out": t.act * heads * v_dim * t.full + (t.rng_states if selective else 0)}
    if ring:  # the ring saves its heads-first output; the output projection keeps a sequence-first copy
        items["core_out"] *= 2
    if selective:
        return items
    if _core_keeps_inputs(t, qk_dim, v_dim, ring, selective):
        return {**items, "lse": LSE * heads * t.full}
    kv_per_sequence = kv_tokens // t.batch
    return {**items, "core_float32": FP32 * (heads * qk_dim * t.full + kv_heads * (qk_dim + v_dim) * kv_tokens),
            "probs": FP32 * heads * t.full * kv_per_sequence}


def mlp_bytes(mlp: MLP, t: Tokens, tokens: int) -> int:
    """An MLP's kept activations past its input: [gate], up, the activation and the product."""
    f = mlp.w1.weight.shape[0]
    return t.act * f * (4 if mlp.w3 is not None else 2) * tokens


def dense_ffn_bytes(mlp: MLP, d: int, t: Tokens, recomputed: bool = False) -> dict[str, int]:
    """``recomputed``: the MLP is recomputed in backward, which keeps only its normalised input."""
    if recomputed:
        return {"ffn_norm": t.norm(d, t.stream) + t.act * d * t.stream + t.rng_states}
    return {"ffn_norm": t.norm(d, t.stream), "mlp_input": _linear_input(t, d), "mlp": mlp_bytes(mlp, t, t.full)}


def moe_bytes(moe: MoELayer, d: int, t: Tokens, etp: int, expert_load: float = 1.0,
              shared_recomputed: bool = False) -> dict[str, int]:
    """``expert_load``: this rank's expert rows over the balanced mean (1: balanced routing).
    ``shared_recomputed``: the shared experts' MLP is recomputed in backward (it keeps its input)."""
    a, routed = t.act, t.routed
    k, num_experts = moe.gate.topk, moe.gate.num_experts
    experts = moe.experts
    f_local = experts.w2.shape[-1] if hasattr(experts, "w2") else experts.te.ffn_hidden_size
    rows = round(k * etp * routed * expert_load)  # rows this rank's experts receive per micro-batch
    items = {"ffn_norm": t.norm(d, t.stream),
             "router": max(a, FP32) * d * routed + FP32 * num_experts * routed + ROUTING_PAIR * k * routed,
             "expert_rows": a * d * rows,
             "experts": a * f_local * (4 if experts.gated else 2) * rows,
             "expert_output_rows": a * d * rows}
    if moe.shared_experts is not None:
        mlp = t.rng_states if shared_recomputed else mlp_bytes(moe.shared_experts, t, t.full)
        items["shared_experts"] = _linear_input(t, d) + mlp
    return items


def block_bytes(block: TransformerBlock, t: Tokens, etp: int, recompute: Recompute,
                expert_load: float = 1.0, pieces: bool = False) -> dict[str, int]:
    """What one block keeps for its backward per micro-batch, item by item (bytes on this rank).
    ``recompute`` comes from the config (one meta model serves every setting). ``pieces``: the
    forward runs as pieces (``--overlap-moe-expert-parallel-comm``)."""
    d = block.attn_norm.dim
    if pieces:  # a piece run holds each block's input (the piece before's output) until backward
        if _cut_at_exchanges(block):
            kept = _piece_block_bytes(block, t, etp, recompute, expert_load)
        elif recompute.full:  # the checkpoint's input is the one held anyway
            kept = {"block_input": t.rng_states}
        else:
            kept = block_bytes(block, t, etp, recompute, expert_load)
        return {**kept, "piece_input": t.act * d * t.stream}
    if recompute.full:
        return {"block_input": t.act * d * t.stream + t.rng_states}
    selective = recompute.core_attn
    attn = block.attn
    items = mla_bytes(attn, d, t, selective) if isinstance(attn, MultiHeadLatentAttention) else gqa_bytes(
        attn, d, t, selective)
    if block.hidden_dropout:
        items["attn_dropout_mask"] = MASK * d * t.stream
        items["ffn_dropout_mask"] = MASK * d * t.stream
    if not isinstance(block.ffn, MoELayer):
        return {**items, **dense_ffn_bytes(block.ffn, d, t, recompute.mlp_alone)}
    if recompute.moe:  # the recomputed MoE keeps its normalised input
        return {**items, "ffn_norm": t.norm(d, t.stream) + t.act * d * t.stream + t.rng_states}
    return {**items, **moe_bytes(block.ffn, d, t, etp, expert_load, recompute.shared_experts_alone)}


def _cut_at_exchanges(block: TransformerBlock) -> bool:
    """Whether a piece run cuts this block at its exchanges (``TransformerBlock.pieces``)."""
    return isinstance(block.ffn, MoELayer) and isinstance(block.ffn.dispatcher, AllToAllDispatcher)


def _piece_block_bytes(block: TransformerBlock, t: Tokens, etp: int, recompute: Recompute,
                       expert_load: float) -> dict[str, int]:
    """A MoE block run as three pieces: the cuts keep the dispatched rows in flight, the
    residual stream after attention and the shared experts' output alive as well (besides the
    block's input, :func:`block_bytes`), and recompute rebuilds only what lies
    between the exchanges (``TransformerBlock.pieces``): the attention half under full
    recompute, the routed and shared experts' MLPs under full and MoE recompute; the routing,
    the exchanged rows and the norms' inputs stay."""
    d = block.attn_norm.dim
    plain = block_bytes(block, t, etp, Recompute(core_attn=recompute.core_attn,
                                                 shared_experts=recompute.shared_experts_alone), expert_load)
    attention = {k: v for k, v in plain.items() if k not in _FFN_ITEMS}
    ffn = {k: v for k, v in plain.items() if k in _FFN_ITEMS}
    if recompute.full:  # its checkpoint keeps the block's input, which the piece run holds anyway
        attention = {"block_input": t.rng_states}
    if recompute.full or recompute.moe:
        ffn["experts"] = t.rng_states  # the received rows, kept anyway, are the recomputation's input
        if "shared_experts" in ffn:
            ffn["shared_experts"] = _linear_input(t, d) + t.rng_states
    cuts = {"rows_in_flight": ffn["expert_rows"], "residual": t.act * d * t.stream}
    if "shared_experts" in ffn:
        cuts["shared_output"] = t.act * d * t.stream
    return {**attention, **ffn, **cuts}


def head_bytes(model: GPTModel, t: Tokens, etp: int = 1, expert_load: float = 1.0,
               recompute: Recompute = Recompute()) -> dict[str, int]:
    """The last stage's loss: the final norm, the fused head's float32 weight and input gradients,
    and each MTP depth's norms, projection input, block and head."""
    d, v_local = model.args.hidden_size, model.padded_vocab // t.tp
    one_head = t.norm(d, t.stream) + FP32 * v_local * d + FP32 * d * t.full

    items = {"head": one_head}
    for depth, mtp in enumerate(model.mtp, start=1):
        items[f"mtp{depth}"] = (2 * t.norm(d, t.stream) + t.act * 2 * d * t.stream
                                + sum(block_bytes(mtp.block, t, etp, recompute, expert_load).values()) + one_head)
    return items


@dataclass
class StagePlan:
    """One pipeline rank's activations. ``chunk_bytes``: what one micro-batch keeps in each of
    its model chunks (the loss's share included); ``in_flight``: the micro-batch-chunks alive at
    the schedule's peak, ``kept_peak`` their bytes. On top come the transients: the head's
    forward (one chunk of logits) and the backward's (a recomputed layer, a weight gradient in
    the parameters' dtype before it joins the float32 main gradient). The head's kept bytes are
    freed when backward begins, so a backward transient on the last stage stands in their place."""

    chunk_bytes: list[int]
    head: int  # kept by the loss, per micro-batch, on the rank that computes it
    head_transient: int
    in_flight: int
    kept_peak: int
    backward_transient: int
    items: dict[str, int] = field(default_factory=dict)  # one micro-batch, summed over this rank's layers

    @property
    def transient(self) -> int:
        return max(self.head_transient, self.backward_transient - self.head)

    @property
    def peak(self) -> int:
        """Activation bytes at the peak, above the training state."""
        return self.kept_peak + self.transient


def tokens_of(config: Config, state: ParallelState, cpu: bool = False) -> Tokens:
    m, p = config.model, config.parallel
    cp = state.cp.size
    seq = m.seq_length // cp
    seq_kv = m.seq_length if cp > 1 and p.cp_comm_type == "allgather" else seq
    act = PrecisionPolicy.from_config(config).params_dtype.itemsize
    return Tokens(seq, config.training.micro_batch_size, seq_kv, state.tp.size,
                  p.sequence_parallel and state.tp.size > 1, act, cpu)


def _simulate(actions, chunk_bytes: list[int]) -> tuple[int, int]:
    """(peak bytes, peak count) of micro-batch-chunks alive: from a forward until its backward
    (or, when the backward defers its weight gradients, until that W: a bound)."""
    alive, deferred = {}, []
    peak = count = 0
    for a in actions:
        if a.kind == "F":
            alive[(a.micro, a.chunk)] = chunk_bytes[a.chunk]
        elif a.kind == "B":
            if a.defer_w:
                deferred.append((a.micro, a.chunk))
            else:
                alive.pop((a.micro, a.chunk))
        elif a.kind == "W":
            alive.pop(deferred.pop(0))
        total = sum(alive.values())
        if total > peak:
            peak, count = total, len(alive)
    return peak, count


def stage_plan(config: Config, state: ParallelState, num_micro: int, cpu: bool = False,
               expert_load: float = 1.0, model: Optional[GPTModel] = None) -> StagePlan:
    """The activation plan of the rank ``state`` describes (``ParallelState.without_process_groups``).
    ``expert_load``: the rows this rank's experts receive over the balanced mean (routing is
    balanced at 1; plan the most loaded rank with more). ``cpu``: torch's CPU kernels.
    ``model``: its meta model, when already built."""
    model = model if model is not None else meta_model(config, state)
    t = tokens_of(config, state, cpu)
    recompute = Recompute.of(config.model, config.moe)  # from the config: one meta model serves every setting
    pieces = config.moe.overlap_moe_expert_parallel_comm
    etp = state.etp.size
    items: dict[str, int] = {}
    chunk_bytes, recomputed = [], [0]
    for names in model.chunk_layers:
        total = 0
        for name in names:
            block = model.layers[name]
            layer = block_bytes(block, t, etp, recompute, expert_load, pieces)
            for key, value in layer.items():
                items[key] = items.get(key, 0) + value
            total += sum(layer.values())
            recomputed.append(_recomputed(block, t, etp, recompute, expert_load, pieces and _cut_at_exchanges(block)))
        chunk_bytes.append(total)
    head = head_transient = 0
    if model.last_stage:
        head = sum(head_bytes(model, t, etp, expert_load, recompute).values())
        chunk_bytes[model.output_chunk] += head
        head_transient = _head_transient(model, t)
    _, actions = build_schedule(config.parallel.pipeline_schedule, state.pp.size, state.pp.rank, num_micro,
                                state.layout.vpp or 1, paired=config.moe.overlap_moe_expert_parallel_comm)
    kept_peak, in_flight = _simulate(actions, chunk_bytes)
    weight_grad = max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), default=0)
    return StagePlan(chunk_bytes, head, head_transient, in_flight, kept_peak, max(recomputed) + weight_grad,
                     {**items, "head": head})


def _recomputed(block: TransformerBlock, t: Tokens, etp: int, recompute: Recompute, expert_load: float,
                cut: bool = False) -> int:
    """What backward rebuilds of one block before running through it: the whole block under
    full recompute, its MoE FFN under MoE recompute, its MLP or shared experts when those are
    recomputed, else nothing; in pieces (``cut``) the largest region between two exchanges
    (the attention half, or the experts' MLPs)."""
    whole = block_bytes(block, t, etp, Recompute(), expert_load)
    if cut and (recompute.full or recompute.moe):
        mlps = whole["experts"] + whole.get("shared_experts", 0)
        attention = sum(v for k, v in whole.items() if k not in _FFN_ITEMS)
        return max(mlps, attention) if recompute.full else mlps
    if recompute.full:
        return sum(whole.values())
    moe = isinstance(block.ffn, MoELayer)
    if moe and recompute.moe:
        return sum(v for k, v in whole.items() if k in _FFN_ITEMS)
    if not moe and recompute.mlp_alone:
        return whole["mlp"]
    if moe and recompute.shared_experts_alone:
        return whole.get("shared_experts", 0)
    return 0


_FFN_ITEMS = ("ffn_norm", "mlp_input", "mlp", "router", "expert_rows", "experts", "expert_output_rows",
              "shared_experts", "ffn_dropout_mask")


def _head_transient(model: GPTModel, t: Tokens) -> int:
    """The fused head's forward, one chunk of tokens at a time: the chunk's logits (in the
    activations' dtype, the gradient written over them by the CUDA kernels; torch's CPU path
    adds a float32 copy, and the weight gradient's product before it is added) and the chunk's
    float32 input gradient."""
    d, v_local = model.args.hidden_size, model.padded_vocab // t.tp
    chunk = min(t.full, chunk_tokens(v_local, FP32 if t.cpu else t.act))
    if t.cpu:
        return chunk * v_local * (t.act + FP32) + FP32 * v_local * d + FP32 * chunk * d
    return chunk * v_local * t.act + FP32 * chunk * d
