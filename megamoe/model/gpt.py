"""The GPT model: embedding, transformer layers, final norm, output head, multi-token prediction.

Activations are sequence first, ``[s, b, hidden]``; the model takes token ids ``[b, s]`` as
data loaders produce them. Build it on the meta device, move it with ``to_empty``, then call
``init_weights(seed)``: every parameter is drawn from a generator seeded by the global seed and
the parameter's name, from the full (unsharded) tensor, so every parallel layout starts from the
weights of the single-process model.

The vocabulary is padded for efficient vocab-parallel GEMMs; padded logits are masked to -inf,
so the padding (which depends on TP) never changes the loss. The head and the loss are one fused,
chunked operation (``parallel/cross_entropy.py``): the full logits are never materialised.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn as nn

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.model.args import GPTArgs
from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.block import TransformerBlock
from megamoe.model.experts import GroupedExperts
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.mlp import MLP
from megamoe.model.moe import MoELayer, MoEStats
from megamoe.model.norm import Norm, build_norm
from megamoe.parallel.pieces import Piece, PieceRun
from megamoe.model.rope import RotaryEmbedding
from megamoe.model.router import TopKRouter
from megamoe.parallel import mappings
from megamoe.parallel.context_parallel import sequence_shard_indices
from megamoe.parallel.cross_entropy import linear_cross_entropy
from megamoe.parallel.expert_parallel import AllGatherDispatcher, AllToAllDispatcher
from megamoe.parallel.param_spec import ParamSpec, Split, set_spec
from megamoe.parallel.random import RNGStatesTracker, recompute_with_rng
from megamoe.parallel.state import ParallelState
from megamoe.parallel.tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedLinear,
    VocabParallelEmbedding,
    normal_init,
)
from megamoe.parallel.weight_grad import WeightGradStore


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class LossWeights:
    """The gradient each loss of a piece run gets (the training step's loss assembly): the LM
    loss sum, each MTP depth's, and every balancing loss (aux and z)."""

    lm: float | torch.Tensor
    mtp: list
    balance: float | torch.Tensor


@dataclass
class ModelOutput:
    """Sums over this rank's tokens; the training step normalises them over the global batch.
    Stages before the last pipeline stage return their output activation in ``hidden`` and no
    losses."""

    lm_loss_sum: Optional[torch.Tensor]
    num_tokens: Optional[torch.Tensor]
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)
    mtp_num_tokens: list[torch.Tensor] = field(default_factory=list)
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer (MTP blocks last)
    moe_index: list[int] = field(default_factory=list)  # the global MoE-layer ordinal of each moe_stats
    hidden: Optional[torch.Tensor] = None  # output activation for the next pipeline stage


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to_empty(device)`` that keeps the attributes parameters carry (which group
    owns their gradient, how they are sharded): moving off the meta device creates new
    Parameter objects, which would silently drop them."""
    attributes = {name: dict(p.__dict__) for name, p in module.named_parameters()}
    module = module.to_empty(device=device)
    for name, p in module.named_parameters():
        p.__dict__.update(attributes[name])
    return module


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction depth: combine the previous depth's hidden state with
    the embedding of the token ``depth`` positions ahead, run one transformer layer, and predict
    with the shared head (behind this module's own final norm)."""

    def __init__(self, block: TransformerBlock, hidden_size: int, normalization: str, norm_eps: float,
                 sequence_parallel: bool, init_fn, device=None, dtype=None):
        super().__init__()
        norm = dict(sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.enorm = build_norm(normalization, hidden_size, norm_eps, **norm)
        self.hnorm = build_norm(normalization, hidden_size, norm_eps, **norm)
        self.eh_proj = ReplicatedLinear(2 * hidden_size, hidden_size, grad_partial_over_tp=sequence_parallel,
                                        init_fn=init_fn, device=device, dtype=dtype)
        self.block = block
        self.norm = build_norm(normalization, hidden_size, norm_eps, **norm)

    def forward(self, hidden, embedded_ahead, positions, rng_tracker=None):
        x = self.eh_proj(torch.cat([self.enorm(embedded_ahead), self.hnorm(hidden)], dim=-1))
        return self.block(x, positions, rng_tracker)


class GPTModel(nn.Module):
    """A decoder-only transformer, dense or MoE, with multi-head / grouped-query or latent
    attention, in every parallel layout.

    ``args`` is the model (:func:`megamoe.model.args.gpt_args` resolves it from the flags);
    ``chunk_ranges`` the ``[start, end)`` decoder-layer ranges this rank holds, one per model
    chunk (``virtual_stage_layer_ranges``; default: every layer, one chunk). Layers are named by
    their global index so names and initial weights match the single-process model. The
    embedding lives on the first stage, the final norm, head and MTP modules on the last. The
    last stage also keeps a copy of the embedding when the head is tied to it or MTP reads it;
    the copy starts equal (same name, same initialisation) and stays equal because the gradient
    buffers sum the two copies' gradients over the ``embd`` group. ``ends``: (the chunk that
    starts the model, the chunk that ends it) on this rank, None where it holds neither; by
    default the loop placement's (the first rank's chunk 0, the last rank's last chunk). The V
    placement (DualPipeV) has both ends on rank 0.
    """

    def __init__(self, args: GPTArgs, state: ParallelState, chunk_ranges: Optional[list[tuple[int, int]]] = None,
                 sequence_parallel: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, fp8_layers: Optional[Sequence[Optional[Fp8Recipe]]] = None,
                 ends: Optional[tuple[Optional[int], Optional[int]]] = None):
        super().__init__()
        self.args, self.state = args, state
        self.wgrad_store: Optional[WeightGradStore] = None  # defer_weight_grads
        tp = state.tp
        sp = sequence_parallel and tp.size > 1
        self.sequence_parallel = sp
        self.vocab_size = args.vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab_size, args.make_vocab_size_divisible_by, tp.size)
        self.recompute_full = args.recompute.full
        kw = dict(device=device, dtype=dtype)
        init_fn = normal_init(args.init_method_std)
        chunk_ranges = chunk_ranges or [(0, args.num_layers)]
        self.num_chunks = len(chunk_ranges)
        if ends is None:  # the loop placement: the first rank's first chunk, the last rank's last
            ends = (0 if state.is_first_stage else None, self.num_chunks - 1 if state.is_last_stage else None)
        self.input_chunk, self.output_chunk = ends
        self.first_stage, self.last_stage = self.input_chunk is not None, self.output_chunk is not None
        # The head tied to the embedding, and MTP, read the embedding on the last stage.
        last_stage_reads_embedding = args.tie_embeddings or args.mtp_num_layers > 0
        self.embed = None
        if self.first_stage or (self.last_stage and last_stage_reads_embedding):
            self.embed = VocabParallelEmbedding(self.padded_vocab, args.hidden_size, tp, sequence_parallel=sp,
                                                init_fn=init_fn, **kw)
            # the global table has the real vocabulary; two copies (first and last pipeline
            # rank) are summed over `embd` (parallel/data_parallel.py); a V placement holds both
            # ends on one rank, with one copy
            set_spec(self.embed.weight, self._vocab_spec("embedding").with_(
                shared_embedding=state.pp.size > 1 and last_stage_reads_embedding
                and not (self.first_stage and self.last_stage)))
        a = args.attention
        self.rope = RotaryEmbedding(a.rope_dim, a.max_positions, a.rope_base, a.yarn, device=device,
                                    interpolation=a.position_interpolation)
        is_moe = args.moe_layers
        self.chunk_layers = [[str(i) for i in range(start, end)] for start, end in chunk_ranges]
        # Global ordinal of each MoE layer (MTP blocks count after the decoder), per chunk; MTP
        # blocks belong to the last chunk.
        moe_ordinal = {i: n for n, i in enumerate(i for i, flag in enumerate(is_moe) if flag)}
        self.num_moe_layers = len(moe_ordinal)
        self.chunk_moe_index = [[moe_ordinal[int(i)] for i in names if int(i) in moe_ordinal]
                                for names in self.chunk_layers]
        if self.last_stage:
            self.chunk_moe_index[self.output_chunk] += [moe_ordinal[i] for i in range(args.num_layers, args.num_blocks)
                                         if i in moe_ordinal]
        self.moe_index = [i for chunk in self.chunk_moe_index for i in chunk]  # in moe_layers() order
        # each block's FP8 recipe (precision.py), or None: the embedding, head and routers never run in FP8
        fp8_layers = tuple(fp8_layers) if fp8_layers is not None else (None,) * args.num_blocks
        if len(fp8_layers) != args.num_blocks:
            raise ValueError(f"fp8_layers has {len(fp8_layers)} entries for {args.num_blocks} blocks")
        # TE's delayed amax histories shared by the whole stage, dense and expert layers (Megatron's default)
        fp8_layers = tuple(replace(r, te_amax_group=state.tp_dp_cp)
                           if r is not None and r.granularity == "delayed" and not r.tp_only_amax_reduction else r
                           for r in fp8_layers)
        self.layers = nn.ModuleDict({
            name: self._build_block(args, state, is_moe[int(name)], fp8_layers[int(name)], **kw)
            for names in self.chunk_layers for name in names
        })
        self.norm = self.head = None
        self.mtp = nn.ModuleList()
        if self.last_stage:
            self.norm = build_norm(args.normalization, args.hidden_size, args.norm_eps, sequence_parallel=sp, **kw)
            if not args.tie_embeddings:
                self.head = ColumnParallelLinear(args.hidden_size, self.padded_vocab, tp, sequence_parallel=sp,
                                                 init_fn=init_fn, **kw)
                set_spec(self.head.weight, self._vocab_spec("head"))
            self.mtp.extend(
                MTPModule(self._build_block(args, state, is_moe[args.num_layers + k], fp8_layers[args.num_layers + k],
                                            **kw),
                          args.hidden_size, args.normalization, args.norm_eps, sp, init_fn, **kw)
                for k in range(args.mtp_num_layers))

    # ------------------------------------------------------------------ construction

    def _vocab_spec(self, role) -> ParamSpec:
        """The embedding's or head's spec: the real vocabulary's rows, cut over TP as the padded."""
        return ParamSpec(role, (self.vocab_size, self.args.hidden_size), (Split(0, "tp", padded=self.padded_vocab),))

    def _build_block(self, args: GPTArgs, state: ParallelState, moe_layer: bool, fp8: Optional[Fp8Recipe],
                     device, dtype):
        sp, a = self.sequence_parallel, args.attention
        kw = dict(device=device, dtype=dtype)
        init_fn = normal_init(args.init_method_std)
        # Output projections start smaller so the residual stream's variance does not grow with depth.
        output_init_fn = normal_init(args.init_method_std / math.sqrt(2.0 * args.num_blocks))
        common = dict(tp=state.tp, sequence_parallel=sp, init_fn=init_fn, output_init_fn=output_init_fn, fp8=fp8, **kw)
        norm = dict(qk_layernorm=a.qk_layernorm, normalization=args.normalization, norm_eps=args.norm_eps)
        if a.kind == "mla":
            attn = MultiHeadLatentAttention(
                args.hidden_size, a.num_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_head_dim,
                a.qk_pos_emb_head_dim, a.v_head_dim, self.rope, cp=state.cp, cp_comm_type=a.cp_comm_type,
                attention_dropout=a.dropout, **norm, **common)
        else:
            attn = GroupedQueryAttention(
                args.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, self.rope, cp=state.cp,
                cp_comm_type=a.cp_comm_type, attention_dropout=a.dropout, **norm, **common)
        attn.recompute_core = args.recompute.core_attn
        if moe_layer:
            ffn = self._build_moe(args, state, init_fn, output_init_fn, fp8, **kw)
        else:
            ffn = MLP(args.hidden_size, args.ffn_hidden_size, gated=args.swiglu, **common)
        return TransformerBlock(attn, ffn, args.hidden_size, args.norm_eps, sp, args.hidden_dropout,
                                normalization=args.normalization,
                                recompute_ffn=args.moe.recompute if moe_layer else args.recompute.mlp_alone, **kw)

    def _build_moe(self, args: GPTArgs, state: ParallelState, init_fn, output_init_fn, fp8: Optional[Fp8Recipe],
                   device, dtype) -> MoELayer:
        moe, sp = args.moe, self.sequence_parallel
        E = moe.num_experts
        router = TopKRouter(
            args.hidden_size, E, moe.topk, moe.score_function, moe.pre_softmax, moe.num_groups, moe.group_topk,
            moe.topk_scaling_factor, moe.load_balancing, moe.aux_loss_coeff, moe.z_loss_coeff,
            moe.enable_expert_bias, moe.bias_update_rate, moe.capacity_factor, moe.drop_policy,
            grad_partial_over_tp=state.tp.size > 1, init_fn=init_fn, router_dtype=moe.router_dtype,
            random_logits=moe.random_logits, device=device, dtype=dtype)
        num_local = E // state.ep.size
        experts = GroupedExperts(
            E, num_local, state.ep.rank * num_local, args.hidden_size, moe.ffn_hidden_size, state.etp,
            moe.expert_backend, init_fn, output_init_fn, gated=args.swiglu, fp8=fp8, device=device, dtype=dtype)
        shared = None
        if moe.shared_ffn_hidden_size:
            shared = MLP(args.hidden_size, moe.shared_ffn_hidden_size, state.tp, sp, init_fn, output_init_fn,
                         gated=args.swiglu, fp8=fp8, device=device, dtype=dtype)
        if moe.dispatcher == "alltoall":
            dispatcher = AllToAllDispatcher(state.ep, state.etp, E, moe.pad_to_capacity, moe.pad_multiple,
                                            fp8_dispatch=moe.fp8_dispatch and experts.fp8 is not None,
                                            num_chunks=moe.a2a_chunks)
        else:
            dispatcher = AllGatherDispatcher(state.etp_ep, E, num_local, state.ep.rank * num_local, moe.pad_to_capacity,
                                             moe.pad_multiple)
        layer = MoELayer(router, experts, shared, dispatcher, state.tp, state.dp, sp, moe.shared_expert_overlap,
                         token_group=state.tp_cp)
        layer.recompute_shared_experts = args.recompute.shared_experts_alone
        return layer

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Draw every weight from a generator keyed by (seed, module name): layout-invariant."""
        for name, module in self.named_modules():
            init = getattr(module, "init_weights", None)
            if module is self or init is None:
                continue
            device = next((t.device for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))),
                          torch.device("cpu"))
            key = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
            init(torch.Generator(device=device).manual_seed(key))

    # ------------------------------------------------------------------ forward

    def defer_weight_grads(self, store: Optional[WeightGradStore]) -> None:
        """Let ``store`` defer the weight gradients of the dense linears and the experts (a
        zero-bubble pipeline schedule's ``W``; ``parallel/weight_grad.py``). None: never."""
        for module in self.modules():
            if hasattr(module, "wgrad_store"):
                module.wgrad_store = store

    def moe_layers(self) -> list[MoELayer]:
        blocks = list(self.layers.values()) + [mtp.block for mtp in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoELayer)]

    def _run_block(self, block, x, positions, rng_tracker):
        if self.recompute_full and self.training:
            return recompute_with_rng(block, x, positions, rng_tracker, rng_tracker=rng_tracker)
        return block(x, positions, rng_tracker)

    def _token_loss(self, hidden, norm: Norm, labels_SB, mask_SB):
        """(loss sum over this rank's tokens, their count): the output projection (the head, or
        the embedding table when tied, split over TP the same way) fused with the vocab-parallel
        cross entropy, in chunks of tokens (``parallel/cross_entropy.py``)."""
        x = mappings.enter_tensor_region(norm(hidden), self.state.tp, self.sequence_parallel)
        weight = self.head.weight if self.head is not None else self.embed.weight
        loss_sum = linear_cross_entropy(x.flatten(0, 1), weight, labels_SB.flatten(), mask_SB.flatten(),
                                        self.state.tp, self.vocab_size)
        return loss_sum, mask_SB.sum()

    def _sequences(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor]):
        """Sequence-first tokens, labels and mask, this CP rank's positions, and ``shard`` (this
        CP rank's tokens of a whole-sequence tensor)."""
        cp = self.state.cp
        tokens_SB, labels_SB = tokens.t(), labels.t()
        mask_SB = (torch.ones_like(labels_SB, dtype=torch.float32) if loss_mask is None else loss_mask.t().float())
        positions = sequence_shard_indices(tokens_SB.shape[0], cp.size, cp.rank, tokens.device)

        def shard(t_SB: torch.Tensor) -> torch.Tensor:
            return t_SB if cp.size == 1 else t_SB.index_select(0, positions)

        return tokens_SB, labels_SB, mask_SB, positions, shard

    def _head(self, x, tokens_SB, labels_SB, mask_SB, positions, shard, rng_tracker) -> ModelOutput:
        """The last stage's losses: the LM loss, then the MTP depths (their MoE statistics in
        ``moe_stats``)."""
        lm_sum, num_tokens = self._token_loss(x, self.norm, shard(labels_SB), shard(mask_SB))
        out = ModelOutput(lm_sum, num_tokens)
        hidden = x
        for depth, mtp in enumerate(self.mtp, start=1):
            # Depth k sees the token k positions ahead and predicts the one after it; the last k
            # positions have no such token and are masked. Shifted on whole sequences, then sharded.
            ahead = shard(torch.roll(tokens_SB, -depth, dims=0))
            depth_labels = shard(torch.roll(labels_SB, -depth, dims=0))
            depth_mask = torch.roll(mask_SB, -depth, dims=0)
            depth_mask[-depth:] = 0.0
            hidden, s = mtp(hidden, self.embed(ahead), positions, rng_tracker)
            out.moe_stats += [s] if s is not None else []
            loss_sum, count = self._token_loss(hidden, mtp.norm, depth_labels, shard(depth_mask))
            out.mtp_loss_sums.append(loss_sum)
            out.mtp_num_tokens.append(count)
        return out

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                rng_tracker: Optional[RNGStatesTracker] = None, hidden_in: Optional[torch.Tensor] = None,
                chunk: int = 0) -> ModelOutput:
        """``tokens``, ``labels``, ``loss_mask``: ``[b, s]``, whole sequences. Returns loss sums over
        this rank's tokens (its share of each sequence under context parallelism).
        ``hidden_in``: except on the first (virtual) stage, the previous stage's output.
        ``chunk``: which of this rank's model chunks to run (interleaved pipeline)."""
        tokens_SB, labels_SB, mask_SB, positions, shard = self._sequences(tokens, labels, loss_mask)
        stats: list[MoEStats] = []
        x = self.embed(shard(tokens_SB)) if chunk == self.input_chunk else hidden_in
        for name in self.chunk_layers[chunk]:
            x, s = self._run_block(self.layers[name], x, positions, rng_tracker)
            stats += [s] if s is not None else []
        if chunk != self.output_chunk:
            return ModelOutput(None, None, moe_stats=stats, moe_index=self.chunk_moe_index[chunk], hidden=x)
        out = self._head(x, tokens_SB, labels_SB, mask_SB, positions, shard, rng_tracker)
        out.moe_stats, out.moe_index = stats + out.moe_stats, self.chunk_moe_index[chunk]
        return out

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[b, s, vocab]`` of a whole model in one process (no TP, PP or CP):
        for evaluation and conversion checks, where training never materialises them."""
        if not (self.first_stage and self.last_stage and self.num_chunks == 1) or self.state.tp.size > 1 \
                or self.state.cp.size > 1:
            raise ValueError("GPTModel.logits needs the whole model in one process (TP, PP and CP of 1)")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens.t())
        for name in self.chunk_layers[0]:
            x, _ = self.layers[name](x, positions, None)
        weight = (self.head.weight if self.head is not None else self.embed.weight)[:self.vocab_size]
        return torch.nn.functional.linear(self.norm(x), weight).transpose(0, 1)

    def piece_run(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
                  rng_tracker: Optional[RNGStatesTracker], hidden_in: Optional[torch.Tensor], chunk: int,
                  weights: LossWeights) -> PieceRun:
        """The same forward as :meth:`forward`, as pieces that a schedule can interleave with
        another micro-batch's (parallel/pieces.py; ``--overlap-moe-expert-parallel-comm``).
        ``weights``: each loss's gradient. :meth:`piece_output` reads the results."""
        tokens_SB, labels_SB, mask_SB, positions, shard = self._sequences(tokens, labels, loss_mask)
        pieces, values, loss_weights = [], {}, {}
        if chunk == self.input_chunk:
            pieces.append(Piece("embed", (), lambda: {"x": self.embed(shard(tokens_SB))}))
        else:
            values["x"] = hidden_in
        for name in self.chunk_layers[chunk]:
            pieces += self.layers[name].pieces(name, positions, rng_tracker, recompute_whole=self.recompute_full)
            loss_weights.update({f"{name}.aux": weights.balance, f"{name}.z": weights.balance})
        if chunk != self.output_chunk:
            return PieceRun(pieces, values, loss_weights, output="x")

        def head(x):
            out = self._head(x, tokens_SB, labels_SB, mask_SB, positions, shard, rng_tracker)
            losses = {"lm_loss_sum": out.lm_loss_sum, **{f"mtp{k}": v for k, v in enumerate(out.mtp_loss_sums)}}
            for k, st in enumerate(out.moe_stats):
                losses.update({f"mtp{k}.aux": st.aux_loss, f"mtp{k}.z": st.z_loss})
            out.moe_stats = [MoEStats(st.aux_loss.detach(), st.z_loss.detach(), st.tokens_per_expert, st.num_dropped)
                             for st in out.moe_stats]
            return {"head": out, **losses}

        pieces.append(Piece("head", ("x",), head))
        loss_weights["lm_loss_sum"] = weights.lm
        for k in range(len(self.mtp)):
            loss_weights.update({f"mtp{k}": weights.mtp[k], f"mtp{k}.aux": weights.balance,
                                 f"mtp{k}.z": weights.balance})
        return PieceRun(pieces, values, loss_weights)

    def piece_output(self, run: PieceRun, chunk: int) -> ModelOutput:
        """What :meth:`forward` returns, from a piece run whose forward is done (losses detached)."""
        stats = [run.result(f"{name}.ctx")["stats"] for name in self.chunk_layers[chunk]
                 if isinstance(self.layers[name].ffn, MoELayer)]
        if chunk != self.output_chunk:
            return ModelOutput(None, None, moe_stats=stats, moe_index=self.chunk_moe_index[chunk],
                               hidden=run.result("x"))
        out = run.result("head")
        return ModelOutput(out.lm_loss_sum.detach(), out.num_tokens, [t.detach() for t in out.mtp_loss_sums],
                           out.mtp_num_tokens, stats + out.moe_stats, self.chunk_moe_index[chunk])
