"""megamoe configuration: nested dataclasses, one docstring per field.

Every field becomes a command-line flag named after the field (``num_layers`` ->
``--num-layers``). Field names follow Megatron-LM's argument names wherever Megatron has the
same concept, so launch scripts carry over. The docstring under each field is its ``--help``
text (read from this file's source by :func:`field_docs`).

Defaults are Megatron-LM's wherever megamoe builds the same thing, so a Megatron launch script
builds the same model and optimizer. Where Megatron requires a value (layers, hidden size,
heads, sequence length, batch sizes, learning rate, iterations) the defaults are small, so a
bare ``python pretrain_moe.py`` trains a tiny dense GPT on CPU in seconds. Megatron defaults
megamoe does not build (learned absolute positions, biases in linear layers) are refused when
asked for, and a run that relies on megamoe's choice instead says so once at start (see
``config_validation.notices``). Model shapes, the demo model included, are presets in
``examples/configs/``.

The ``megatron`` section holds Megatron-LM switches for its own kernels, accepted as documented
no-ops; :data:`FLAG_ALIASES` maps Megatron's other spellings onto fields.

Validation lives in ``megamoe/config_validation.py``; the CLI and YAML loading in
``megamoe/cli.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    """Shape of the transformer (attention, dense MLP, embeddings, MTP)."""

    num_layers: int = 4
    """Number of transformer layers (dense and MoE together). Megatron-LM requires it; the small default keeps a bare run quick (real shapes: examples/configs/)."""
    hidden_size: int = 128
    """Model width: the size of the residual stream. Megatron-LM requires it; small default for a bare run."""
    ffn_hidden_size: Optional[int] = None
    """Intermediate size of the dense MLP (the layers that are not MoE). Unset means 4 x hidden-size, or int(8 x hidden-size / 3 / 64) x 64 with --swiglu (Megatron-LM's rule)."""
    num_attention_heads: int = 4
    """Number of attention heads. Megatron-LM requires it; small default for a bare run."""
    group_query_attention: bool = False
    """Grouped-query attention with --num-query-groups key/value heads. Without it attention is multi-head and --num-query-groups is ignored (as in Megatron-LM)."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads with --group-query-attention. Unset means 1 (Megatron-LM's default)."""
    kv_channels: Optional[int] = None
    """Attention head dimension (GQA/MHA). Unset means hidden-size / num-attention-heads. Ignored by MLA."""
    seq_length: int = 128
    """Training sequence length in tokens. Megatron-LM requires it; small default for a bare run."""
    max_position_embeddings: Optional[int] = None
    """Longest position the rotary tables cover. Unset means seq-length."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Normalisation of every norm layer: LayerNorm (with bias) or RMSNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm layer."""
    swiglu: bool = False
    """Gated SwiGLU MLPs and experts (w2(silu(w1 x) * w3 x)) instead of GeLU MLPs (w2(gelu(w1 x)))."""
    add_bias_linear: Optional[bool] = None
    """Biases in the linear layers. megamoe builds none: Megatron-LM's default (biases) is refused when asked for with --add-bias-linear; --disable-bias-linear states the megamoe model. Unset means no biases, with a notice."""
    qk_layernorm: bool = False
    """Norms on queries and keys: per head before RoPE for GQA (Qwen3); for MLA the norms of the query and key/value latents (DeepSeek's q_norm and kv_norm), as in Megatron-LM."""
    position_embedding_type: Optional[Literal["rope", "learned_absolute", "yarn", "mrope", "relative", "none"]] = None
    """Position embedding. megamoe builds rotary embeddings only ('rope'; YaRN scaling through --rope-type). Unset means rope, with a notice: Megatron-LM's default, learned absolute embeddings, is not built."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates. megamoe supports 1.0 only."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    rope_type: Optional[Literal["rope", "yarn"]] = None
    """Rotary scaling: plain RoPE, or YaRN (uses --rotary-scaling-factor and the mscale fields). Unset means yarn for MLA and rope otherwise (Megatron-LM's rule; YaRN with scaling factor 1 is plain RoPE)."""
    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Linear position interpolation of plain RoPE (Megatron-LM's): every position is divided by this factor before it is rotated, so a model trained at length L covers L x factor. Unset (or 1) means none; YaRN scales with --rotary-scaling-factor instead."""
    rotary_scaling_factor: float = 1.0
    """YaRN context extension factor."""
    original_max_position_embeddings: int = 4096
    """YaRN: the context length the model was originally trained at."""
    beta_fast: float = 32.0
    """YaRN: fast boundary of the frequency ramp (in rotations)."""
    beta_slow: float = 1.0
    """YaRN: slow boundary of the frequency ramp (in rotations)."""
    mscale: float = 1.0
    """YaRN: attention-temperature scale applied through the rotary tables."""
    mscale_all_dim: float = 0.0
    """YaRN: mscale applied to the softmax scale of every dimension (DeepSeek-V2 uses 0.707)."""
    multi_latent_attention: bool = False
    """Use multi-head latent attention (DeepSeek-V2/V3) instead of multi-head / grouped-query attention."""
    q_lora_rank: Optional[int] = None
    """MLA: rank of the query down-projection. 0 or unset means a plain query projection."""
    kv_lora_rank: int = 32
    """MLA: rank of the compressed key/value latent."""
    qk_head_dim: int = 128
    """MLA: per-head query/key dimension without RoPE."""
    qk_pos_emb_head_dim: int = 64
    """MLA: per-head query/key dimension that carries RoPE (the rope key is shared by all heads)."""
    v_head_dim: int = 128
    """MLA: per-head value dimension."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output head its own weight instead of sharing the input embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.1
    """Dropout on the output of attention and MLP blocks before the residual add."""
    mtp_num_layers: int = 0
    """Multi-token prediction: number of extra modules predicting tokens further ahead."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the multi-token-prediction loss (averaged over MTP modules)."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation: 'full' recomputes whole layers, 'selective' the modules of --recompute-modules (by default the attention core; --recompute-activations is Megatron-LM's spelling of selective). Dropout masks are replayed exactly."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """With --recompute-granularity selective: what is recomputed, from Megatron-LM's list. megamoe builds 'core_attn' (the attention core), 'moe' (each MoE layer, as --moe-layer-recompute), 'mlp' (the dense MLP layers) and 'shared_experts' (the shared experts' MLP); 'mla_up_proj', 'layernorm' and 'moe_act' are refused as not built yet."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Where the FP8 layers' linear GEMMs run: megamoe's kernels ('local': recipes rowwise, tensorwise) or Transformer Engine's te.Linear ('transformer_engine': recipes delayed, tensorwise, blockwise). Linears in bf16 run torch's GEMM under either (the same cuBLAS product TE's bf16 Linear runs). The experts' backend is --moe-grouped-gemm-impl."""
    fp8_format: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 training (unset means none; needs --bf16): the linear layers' and experts' GEMMs run in FP8, the embedding, output head and routers do not. 'e4m3' everywhere, or 'hybrid': e4m3 forward, e5m2 gradients."""
    fp8_recipe: Literal["delayed", "tensorwise", "rowwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling, used with --fp8-format. megamoe's kernels (--transformer-impl local, --moe-grouped-gemm-impl torch) run 'rowwise' (one scale per token and per weight row; megamoe's, not Megatron's) and 'tensorwise' (one per tensor, per expert for experts), both from the current values. Transformer Engine (--transformer-impl transformer_engine, --moe-grouped-gemm-impl te) runs 'delayed' (scales from an amax history), 'tensorwise' (current scaling) and 'blockwise' (1x128 activation and 128x128 weight blocks). 'mxfp8' needs Blackwell."""
    fp8_amax_history_len: int = 1
    """Delayed scaling: how many steps of amax history choose the scale."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """Delayed scaling: the scale from the most recent amax or the history's maximum."""
    tp_only_amax_red: bool = False
    """Delayed scaling: reduce the FP8 amaxes over each layer's tensor-parallel group only. By
    default (Megatron's) Transformer Engine reduces them over every TP x DP x CP rank of the
    pipeline stage, so all replicas quantize with one scale history; the current-scaling recipes
    keep no amax history and reduce only where a tensor is cut over TP."""
    fp8_param_gather: bool = False
    """The distributed optimizer quantizes the FP8 layers' weights from its float32 masters and all-gathers them in FP8 (half of bf16's bytes); the weights the model holds are those FP8 values, in bf16 storage. Needs --use-distributed-optimizer and megamoe's FP8 kernels (--transformer-impl local, experts not on te)."""
    fp8_min_linear_size: int = 0
    """Under FP8, dense linear layers whose local out x in / (out + in) (half the GEMM's FLOPs per element of activation it quantizes) is below this run in bf16; 0 (Megatron's behaviour) runs every one in FP8. On one H200 at 32k tokens per micro-batch FP8 paid only from about 1400 (docs/benchmarks.md); the routed experts are not affected."""
    first_last_layers_bf16: bool = False
    """Under FP8, run the first and last transformer layers in bf16 (how many: --num-layers-at-start-in-bf16 / --num-layers-at-end-in-bf16; MTP blocks follow the last layer)."""
    num_layers_at_start_in_bf16: int = 1
    """With --first-last-layers-bf16: the first layers kept in bf16."""
    num_layers_at_end_in_bf16: int = 1
    """With --first-last-layers-bf16: the last layers kept in bf16."""


@dataclass
class MoEConfig:
    """Mixture-of-experts layers: routing, experts, dispatch."""

    num_experts: Optional[int] = None
    """Number of routed experts per MoE layer. Unset (or 0) means a dense model."""
    moe_layer_freq: str = "1"
    """Which layers are MoE: an integer N (every N-th layer) or a 0/1 pattern such as '[0]*1+[1]*3'."""
    moe_ffn_hidden_size: Optional[int] = None
    """Intermediate size of each routed expert. Unset means ffn-hidden-size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Total intermediate size of the shared experts. Unset (or 0) means none."""
    moe_router_topk: int = 2
    """Number of experts each token is routed to."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function: softmax (Mixtral, DeepSeek-V2) or sigmoid (DeepSeek-V3)."""
    moe_router_pre_softmax: bool = False
    """Softmax scores: apply softmax over all experts before top-k (DeepSeek-V2) instead of over the chosen k. No effect with sigmoid scores (as in Megatron-LM)."""
    moe_router_num_groups: Optional[int] = None
    """Group-limited routing: number of expert groups (DeepSeek node-limited routing)."""
    moe_router_group_topk: Optional[int] = None
    """Group-limited routing: number of groups a token may choose experts from."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Scale applied to the top-k probabilities (DeepSeek-V3: 2.5)."""
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = None
    """Precision of the router's logits, scores and losses. Unset means fp32: megamoe never routes in bf16 (Megatron-LM's unset routes in the model's dtype)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """Balancing loss: per micro-batch, per sequence (DeepSeek-V3), per global batch, or none."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss."""
    moe_z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss (unset means off)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias that only chooses experts, updated from load."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update, applied once per optimizer step."""
    moe_expert_capacity_factor: Optional[float] = None
    """Capacity per expert as a multiple of the balanced load; tokens beyond it are dropped. Unset means dropless."""
    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor, pad every expert's input to its capacity (static shapes)."""
    moe_router_padding_for_fp8: bool = False
    """Pad every expert's rows with zero rows to a multiple of 16, the FP8 GEMMs' alignment (the combine weights the padding 0, so no result changes). On by itself for the te expert backend under FP8, which needs it; the native FP8 experts do not."""
    moe_fp8_dispatch: bool = False
    """FP8 on the wire (DeepSeek-V3's dispatch): quantize each token to e4m3 (one power-of-two scale per row) before the permutation and the all-to-all, so they move half the bytes and the experts' first FP8 GEMM takes the rows as they arrive; the combine stays in bf16. The first GEMM's weight gradient then uses the FP8 rows. Needs --fp8-recipe rowwise with megamoe's experts and --moe-token-dispatcher-type alltoall. Layers kept out of FP8 dispatch in bf16."""
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    """With a capacity factor, which tokens an over-full expert keeps: highest probability or earliest."""
    moe_router_force_load_balancing: bool = False
    """Benchmarks only (Megatron-LM's switch): every router routes on random logits (standard normal per token and expert) instead of its own, so the experts' loads are even in expectation whatever the router has learnt, and a throughput figure does not depend on how balanced training happens to be. The real logits still get the gradients (straight through); the model does not learn to route."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "allgather"
    """How tokens reach experts on other ranks: an all-gather of the tokens or an all-to-all of the routed rows. Megatron-LM's 'flex' (DeepEP / HybridEP kernels) is not built yet."""
    moe_flex_dispatcher_backend: Optional[Literal["deepep", "hybridep"]] = None
    """The kernels of Megatron-LM's 'flex' dispatcher. Not built yet."""
    overlap_moe_expert_parallel_comm: bool = False
    """Megatron's name: run each micro-batch's forward interleaved, piece by piece, with another micro-batch's backward, so that one's expert all-to-all is in flight while the other computes (cut at each MoE layer's dispatch and combine). With --pipeline-model-parallel-size 1 every forward pairs with the previous micro-batch's backward (gradient accumulation); under 1F1B (and interleaved 1F1B) the steady state runs as such pairs, after a warm-up of 2 (PP - rank - 1) + (VPP - 1) PP + 1 forwards (up to 2 (PP - rank) micro-batches in flight, twice 1F1B's; with virtual stages one chunk more than interleaved 1F1B); with --pipeline-schedule dualpipev its forward-and-backward pairs run so. Needs the all-to-all dispatcher. Full and MoE-layer recompute then rebuild what lies between a layer's exchanges (the attention half under full, the routed and shared experts' MLPs under both) and keep the exchanged rows and the routing. Not supported yet: --moe-a2a-overlap-chunks, --moe-fp8-dispatch, --compile. With dropout the masks are drawn in another order than without it (still independent masks)."""
    delay_wgrad_compute: bool = False
    """Megatron's name: with --overlap-moe-expert-parallel-comm, each piece's backward leaves the weight gradients of its deferrable GEMMs (megamoe's dense linears and routed experts; not FP8 or Transformer Engine GEMMs) until its input gradients are done, then computes them while the exchange that backward started (the dispatch's reverse, after the experts) is in flight. The same gradients; DualPipeV's own deferred W are left to its schedule."""
    moe_a2a_overlap_chunks: int = 1
    """All-to-all dispatcher: cut each MoE layer's tokens into this many chunks, dispatched and combined one by one, so one chunk's exchange runs while another chunk's experts compute, in forward and in backward. The results are those of one chunk (each token's experts stay in its chunk); one count exchange and one host synchronisation per layer whatever the count. 1: one exchange each way."""
    moe_grouped_gemm: bool = False
    """Run each rank's experts as grouped GEMMs (backend: --moe-grouped-gemm-impl). Without it, one GEMM per expert (Megatron-LM's SequentialMLP)."""
    moe_grouped_gemm_impl: Optional[Literal["loop", "torch", "te"]] = None
    """Expert GEMM backend: 'loop' (one GEMM per expert), 'torch' (torch._grouped_mm), 'te' (Transformer Engine GroupedLinear). Unset means torch with --moe-grouped-gemm, else loop; when given, it wins over --moe-grouped-gemm."""
    moe_shared_expert_overlap: bool = False
    """On CUDA, run the shared experts on a side stream, overlapping dispatch, experts and combine."""
    moe_layer_recompute: bool = False
    """Recompute each MoE layer (routing, dispatch, experts, combine) in backward instead of keeping its activations; under --overlap-moe-expert-parallel-comm only the routed and shared experts' MLPs (a layer cut at its exchanges cannot repeat them)."""

    @property
    def expert_backend(self) -> str:
        """The expert GEMM backend these flags select (see --moe-grouped-gemm-impl)."""
        if self.moe_grouped_gemm_impl is not None:
            return self.moe_grouped_gemm_impl
        return "torch" if self.moe_grouped_gemm else "loop"


@dataclass
class ParallelConfig:
    """Degrees of the five parallel dimensions and how ranks are laid out."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (TP) of attention and dense layers."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between TP regions (needs TP > 1 to matter)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree (PP): number of stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per pipeline rank."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Interleaved pipeline: layers per model chunk (alternative to the virtual size)."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """Layers on the first pipeline stage, when it should differ from the others."""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """Layers on the last pipeline stage, when it should differ from the others."""
    pipeline_model_parallel_layout: Optional[str] = None
    """Megatron-LM's placement of every layer on a virtual pipeline stage: 'Et|(tt|)*30mL' is E the embedding, t a decoder layer, m an MTP layer, L the head and loss, | the end of a virtual stage, x*n and (...)*n repetitions. Virtual stage v runs on pipeline rank v % PP, so the stage count sets the virtual size; E opens the first stage, the MTP layers and L close the last, and a stage may hold no decoder layer. Replaces --decoder-first/last-pipeline-num-layers."""
    pipeline_schedule: Literal["1f1b", "dualpipev"] = "1f1b"
    """Pipeline schedule. '1f1b': one forward, one backward (interleaved over the chunks of
    --virtual-pipeline-model-parallel-size when set). 'dualpipev': DeepSeek's DualPipeV: each rank
    holds two chunks placed as a V (rank 0 the first and the last layers), micro-batches flow
    from both ends, and backward passes leave the dense linears' and experts' weight gradients
    to fill the bubbles; a bubble of (pp/2 - 1)(F&B + B - 3W) instead of 1F1B's (pp - 1)(F + B).
    Needs at least 2 x --pipeline-model-parallel-size micro-batches and no virtual size; the
    layers split over 2 x pp stages (--decoder-first/last-pipeline-num-layers: the first and last
    of those)."""
    context_parallel_size: int = 1
    """Context-parallel degree (CP): each sequence is sharded over this many ranks."""
    cp_comm_type: Literal["p2p", "allgather", "a2a", "a2a+p2p"] = "p2p"
    """How context-parallel attention exchanges keys and values. 'p2p': a ring of point-to-point
    transfers overlapped with the blockwise attention, merged by log-sum-exp (no attention
    dropout). 'allgather': one all-gather of the keys and values per layer. MLA exchanges its
    compressed latent under both and re-expands it. Megatron's 'a2a' and 'a2a+p2p'
    (head-scattering all-to-all) are not built."""
    expert_model_parallel_size: int = 1
    """Expert-parallel degree (EP): routed experts are spread over this many ranks."""
    expert_tensor_parallel_size: Optional[int] = None
    """Tensor-parallel degree inside each expert (ETP). Unset means the same as TP."""
    parallel_rank_order: str = "tp-cp-ep-dp-pp"
    """Order of the dimensions in the rank numbering, innermost (neighbouring ranks) first."""
    tp_comm_overlap: bool = False
    """Megatron-LM's overlap of the tensor-parallel all-gathers and reduce-scatters with the GEMMs around them (Transformer Engine's userbuffers). Not built yet."""
    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam states over data-parallel ranks (ZeRO-1): DP x CP for
    dense weights, expert-DP for experts; gradients are reduce-scattered, parameters all-gathered."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's reduction during the last micro-batch's backward, as soon as
    all its gradients are final, instead of after backward."""
    overlap_param_gather: bool = False
    """Distributed optimizer: leave the parameter all-gathers in flight after the step; each
    module waits for its own parameters just before its next forward."""
    ddp_bucket_size: Optional[int] = None
    """Gradient bucket size in elements. Unset means max(40M, 1M x data-parallel size), one
    bucket per buffer for small models."""
    distributed_backend: Literal["nccl", "gloo"] = "nccl"
    """torch.distributed backend; gloo is used automatically when no GPU is present."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations, in minutes."""

    def degrees(self) -> dict:
        """The layout arguments of ``ParallelLayout.build`` / ``ParallelState.build``."""
        return dict(tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
                    cp=self.context_parallel_size, ep=self.expert_model_parallel_size,
                    etp=self.expert_tensor_parallel_size, vpp=self.virtual_pipeline_model_parallel_size,
                    order=self.parallel_rank_order)


@dataclass
class TrainingConfig:
    """Batch sizes, iterations, optimizer, learning-rate schedule and precision."""

    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank. Megatron-LM requires it; small default for a bare run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over data-parallel ranks and micro-batches. Small default for a bare run."""
    step_batch_size_schedule: Optional[str] = None
    """Megatron-LM's growing global batch: "THRESHOLD:BATCH ..." (e.g. "0:768 250B:1536 500B:3072"), from each threshold of tokens consumed (suffixes K, M, B, T; the first 0) the batch after the colon; a step runs at the batch of the tokens consumed before it. The last batch is the global batch size (so not with --global-batch-size). Needs --train-samples."""
    rampup_batch_size: Optional[list[int]] = None
    """Megatron-LM's older ramp, START INCREMENT SAMPLES: the global batch grows from START by INCREMENT in equal slices of SAMPLES samples up to --global-batch-size (deprecated in Megatron, which now ignores it; megamoe ramps as Megatron did). Needs --train-samples."""
    train_iters: int = 40
    """Number of optimizer steps. Megatron-LM requires it (or --train-samples); small default for a bare run."""
    train_samples: Optional[int] = None
    """Sample-based training (Megatron-LM's alternative to --train-iters; give one): the run takes train-samples / global-batch-size steps, and the learning-rate schedule is given in samples (--lr-decay-samples, --lr-warmup-samples, --lr-wsd-decay-samples)."""
    lr: float = 3e-3
    """Peak learning rate. Megatron-LM requires it; the default suits the bare run's tiny model."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup iterations. As in Megatron-LM, step k runs at the schedule's value after k - 1 steps, so with warmup the first step's rate is --lr-warmup-init."""
    lr_warmup_samples: int = 0
    """Sample-based training: linear warmup over this many samples."""
    lr_warmup_fraction: Optional[float] = None
    """Warmup over this fraction of the decay window (--lr-decay-iters or --lr-decay-samples), instead of --lr-warmup-iters / --lr-warmup-samples."""
    lr_warmup_init: float = 0.0
    """The learning rate warmup starts from."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "linear"
    """Learning-rate decay after warmup (Megatron-LM's formulas; inverse-square-root: lr x sqrt(warmup / step), at least --min-lr)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays (warmup included). Unset means train-iters."""
    lr_decay_samples: Optional[int] = None
    """Sample-based training: samples over which the learning rate decays. Unset means train-samples."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: length of the final decay phase in iterations. Unset means 10% of the decay window after warmup (Megatron-LM requires a value)."""
    lr_wsd_decay_samples: Optional[int] = None
    """Sample-based WSD: length of the final decay phase in samples. Unset means 10% of the decay window after warmup."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"
    """WSD: shape of the final decay phase, over r from 0 to 1: lr = min-lr + c x (lr - min-lr) with c = 1 - r, (1 + cos(pi r)) / 2, 2 x 0.5^r - 1 or 1 - sqrt(r) (Megatron-LM's)."""
    optimizer: Literal["adam", "muon"] = "adam"
    """Optimizer: 'adam' (AdamW with decoupled weight decay) or 'muon' (Muon on the weight matrices, AdamW on embeddings, the output head, norms and biases; both with --lr and --weight-decay). Muon orthogonalises each whole matrix in every layout; with --use-distributed-optimizer each matrix by one data-parallel rank."""
    muon_momentum: float = 0.9
    """Muon: momentum (an exponential moving average of the gradient)."""
    muon_nesterov: bool = False
    """Muon: Nesterov-style momentum (the update mixes the gradient and the momentum)."""
    muon_num_ns_steps: int = 5
    """Muon: Newton-Schulz iterations of the orthogonalisation."""
    muon_coefficient_type: Literal["quintic", "simple"] = "quintic"
    """Muon: Newton-Schulz coefficients: 'quintic' (one tuned set per iteration) or 'simple' (Keller Jordan's one set)."""
    muon_scale_mode: Literal["spectral", "shape_scaling", "unit_rms_norm"] = "spectral"
    """Muon: update scale of an m x n matrix: sqrt(max(m, n)) ('spectral'), sqrt(max(1, m/n)) ('shape_scaling') or sqrt(m/n) ('unit_rms_norm'), times --muon-extra-scale-factor."""
    muon_extra_scale_factor: float = 1.0
    """Muon: extra factor on the update; 0.2 with 'spectral' is Moonlight's scaling, whose update RMS matches AdamW's (so AdamW's learning rate carries over)."""
    muon_fp32_matmul_prec: Literal["low", "medium", "high"] = "medium"
    """Muon: the precision of Newton-Schulz's matmuls on GPUs: 'high' full float32, 'medium' TF32 (torch's set_float32_matmul_precision 'highest' / 'high'), 'low' the whole iteration in bf16 (Keller Jordan's Muon)."""
    muon_tp_mode: Literal["blockwise", "duplicated", "distributed"] = "duplicated"
    """Muon under tensor parallelism: 'duplicated' gathers each TP-cut matrix and orthogonalises it whole on every TP rank (the update does not depend on the layout). Megatron-LM's 'blockwise' (each shard alone: the update changes with TP) and 'distributed' are refused."""
    qk_clip: bool = False
    """MuonClip's qk-clip (Kimi K2): after each optimizer step, scale the query and key weights of every attention head whose largest pre-softmax logit in the step exceeded --qk-clip-threshold, so that it would not have (MLA: the head's own query and key parts; the shared rope key stays)."""
    qk_clip_threshold: float = 100.0
    """qk-clip: the largest attention logit a head may reach (tau; Kimi K2 used 100)."""
    qk_clip_alpha: float = 0.5
    """qk-clip: the share of the clip put on the query: with gamma = threshold / max logit, queries scale by gamma^alpha and keys by gamma^(1 - alpha)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    optimizer_cpu_offload: bool = False
    """Megatron-LM's optimizer step on the CPU, with the states in host memory. Not built yet."""
    overlap_cpu_optimizer_d2h_h2d: bool = False
    """With --optimizer-cpu-offload, overlap its copies between device and host. Not built yet."""
    use_precision_aware_optimizer: bool = False
    """Megatron-LM's switch for keeping optimizer tensors in other dtypes (below). megamoe builds Adam's moments in bf16 (--exp-avg-dtype, --exp-avg-sq-dtype); gradients and masters stay float32."""
    main_grads_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients accumulate in. megamoe accumulates in float32 only."""
    main_params_dtype: Literal["fp32", "fp16"] = "fp32"
    """The dtype of the master weights. megamoe keeps float32 masters only."""
    exp_avg_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "fp32"
    """The dtype of Adam's first moment: fp32, or bf16 (with --use-precision-aware-optimizer; updated in float32, stored rounded to nearest; 2 bytes a parameter fewer). fp16 and fp8 are not built."""
    exp_avg_sq_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "fp32"
    """The dtype of Adam's second moment: fp32, or bf16 (as --exp-avg-dtype). fp16 and fp8 are not built."""
    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm (0 disables)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop the run (exit non-zero, no checkpoint written) when the loss or the grad norm is not finite, naming the iteration and the rank."""
    seed: int = 1234
    """Random seed for initialisation, data and dropout."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights and fp32 gradient accumulation."""
    fp16: bool = False
    """Train in float16 with fp32 master weights and dynamic loss scaling (megamoe/training/loss_scale.py)."""
    loss_scale: Optional[float] = None
    """A fixed loss scale (a power of two keeps it exact) instead of the dynamic one of --fp16."""
    initial_loss_scale: float = 2.0 ** 32
    """The dynamic loss scale's starting value."""
    min_loss_scale: float = 1.0
    """The dynamic loss scale never falls below this."""
    loss_scale_window: int = 1000
    """The dynamic loss scale doubles after this many steps without an overflow."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic loss scale is halved (refilled when it grows)."""
    compile: bool = False
    """Compile each transformer block with torch.compile (per block, as torchtitan does). CUDA only: elsewhere the run says so once and stays eager. Off by default: 1.12x eager on one H200 (docs/benchmarks.md), but it adds the compilation to start-up and has been measured on one GPU only."""
    manual_gc: bool = False
    """Turn Python's automatic garbage collector off for the run and collect at set points instead (--manual-gc-interval, --manual-gc-eval), so that collections do not pause ranks at different moments (each pause stalls every rank that waits on the paused one)."""
    manual_gc_interval: int = 0
    """With --manual-gc: collect after every this many iterations (0: never between iterations)."""
    manual_gc_eval: bool = True
    """With --manual-gc: collect before and after each evaluation."""
    eval_interval: Optional[int] = None
    """Run validation every this many iterations. Unset means only after the last iteration."""
    eval_iters: int = 100
    """Validation micro-batches per evaluation."""


@dataclass
class DataConfig:
    """Training data and tokenizer."""

    mock_data: Optional[bool] = None
    """Train on synthetic tokens drawn from a fixed random Markov chain (no files needed). Unset means mock data unless --data-path is given."""
    data_path: Optional[list[str]] = None
    """Indexed datasets (PREFIX.bin/.idx from tools/preprocess_data.py): 'PREFIX', or weighted for blending: '0.3 PREFIX_A 0.7 PREFIX_B'."""
    split: str = "969,30,1"
    """Train/validation/test split of each dataset's documents, as relative weights (contiguous ranges, as in Megatron)."""
    tokenizer_type: Literal["NullTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "Llama2Tokenizer", "HuggingFaceTokenizer"] = "NullTokenizer"
    """Tokenizer kind. The three sentencepiece names are one tokenizer, as in Megatron-LM today: a .model file, end of document = its eos, no BOS added."""
    tokenizer_model: Optional[str] = None
    """The tokenizer's file: a sentencepiece .model, or a local Hugging Face tokenizer.json (or its directory)."""
    vocab_size: int = 512
    """Vocabulary size of mock data and of the NullTokenizer (which adds one end-of-document id); other tokenizers bring their own."""
    model_vocab_size: Optional[int] = None
    """The model's vocabulary when it is larger than the tokenizer's (a published model's padded table, e.g. Qwen3's 151936 rows for 151669 token ids; checkpoints imported from Hugging Face set it). Unset means the tokenizer's (or --vocab-size with mock data)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (times TP) for efficient vocab-parallel GEMMs."""
    data_cache_path: Optional[str] = None
    """Where dataset index caches go (unset means next to the data)."""
    eod_mask_loss: bool = False
    """Leave out of the loss every prediction made from an end-of-document token (the next document's first token, which nothing before it predicts), as Megatron-LM does; the loss is the mean over the tokens left. Needs --data-path."""
    no_mmap_bin_files: bool = False
    """Read the .bin token files with plain file reads instead of memory-mapping them (for file systems where mapping large files is slow); the tokens read are the same."""
    num_workers: int = 2
    """Background threads that prepare the upcoming steps' batches (read and assemble the samples, move them to the device), one step each, so up to this many steps ahead of training; 0 prepares each step's batches in the training loop. Megatron-LM's default (its workers are DataLoader processes)."""

    @property
    def uses_mock_data(self) -> bool:
        """Mock data when --mock-data is set, or when neither it nor --data-path is given."""
        return self.mock_data if self.mock_data is not None else not self.data_path


@dataclass
class LoggingConfig:
    """What is printed and written to tensorboard."""

    log_interval: int = 100
    """Print a log line every this many iterations (and after the last one)."""
    tensorboard_dir: Optional[str] = None
    """Write tensorboard event files here (unset means no tensorboard)."""
    moe_expert_load_image_interval: int = 100
    """Write a per-layer expert-load heat map to tensorboard every this many iterations."""
    metrics_file: Optional[str] = None
    """Also write every iteration's losses, learning rate and grad norm to this JSON-lines file."""
    log_params_norm: bool = False
    """Also log the L2 norm of the parameters after each step (their float32 masters, each element counted once in every layout): the log line's 'params norm' and tensorboard's params-norm. Costs one pass over the masters and one all-reduce per step."""
    log_num_zeros_in_grad: bool = False
    """Also log how many elements of the step's gradient are zero (each counted once in every layout): the log line's 'num zeros' and tensorboard's num-zeros. Costs one pass over the gradients and one all-reduce per step."""
    log_memory_to_tensorboard: bool = False
    """Also write the CUDA allocator's state every iteration: allocated, reserved and peak reserved GiB, and the allocation retries (a sign of fragmentation). The peak allocated memory is always written. Nothing more on CPUs."""
    log_validation_ppl_to_tensorboard: bool = False
    """Also write the validation perplexity (the loss is always written)."""
    log_timers_to_tensorboard: bool = False
    """Also write timers: each iteration's time, and the time of every evaluation and checkpoint save (and the pipeline wait where it is timed)."""
    logging_level: Optional[int] = None
    """Python logging level of megamoe's warnings and notes (10 debug, 20 info, 30 warning, 40 error). Unset means warnings, shown once, by rank 0 (other ranks show errors). The per-iteration log line is always printed."""
    log_max_attention_logit: bool = False
    """Log each attention layer's largest pre-softmax logit of the step (over its heads and the global batch) to tensorboard and the log line; on with --qk-clip."""
    profile: bool = False
    """Profile iterations profile-step-start + 1 .. profile-step-end with torch.profiler: a trace for Perfetto or TensorBoard, and a summary of the time by model stage and kernel (also cudaProfilerStart/Stop for nsys)."""
    profile_step_start: int = 10
    """Profiling starts after this many iterations."""
    profile_step_end: int = 12
    """Profiling stops after this iteration."""
    profile_ranks: list[int] = field(default_factory=list)
    """Global ranks that profile. Empty means every rank (Megatron-LM's default)."""
    profile_dir: Optional[str] = None
    """Where the trace (rank-R.json.gz) and summary go. Unset means <tensorboard-dir>/../torch_profile, as Megatron-LM writes it."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases, in this project: every scalar, histogram and image written to tensorboard, by the same rank (needs the wandb package; WANDB_MODE=offline writes locally)."""
    wandb_exp_name: Optional[str] = None
    """The W&B run's name. Unset means W&B's generated name."""
    wandb_save_dir: Optional[str] = None
    """Where W&B writes its local files. Unset means <--save>/wandb (Megatron-LM's place), or W&B's default without --save."""
    wandb_entity: Optional[str] = None
    """The W&B entity (team or user) that owns the project. Unset means your default entity."""


@dataclass
class CheckpointConfig:
    """Saving and loading."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to load a checkpoint from."""
    save_interval: Optional[int] = None
    """Save every this many iterations (and at the end of training)."""
    no_save_optim: bool = False
    """Save the model's weights only, without optimizer state (smaller checkpoints for evaluation or fine-tuning; resuming from one needs --no-load-optim or --finetune, and starts a fresh optimizer from the saved weights)."""
    no_load_optim: bool = False
    """Do not load optimizer state when loading a checkpoint: a fresh optimizer starts from the loaded weights."""
    no_load_rng: bool = False
    """Do not load RNG state when loading a checkpoint."""
    finetune: bool = False
    """Load the model weights only and start at iteration 0 with a fresh optimizer (implies --no-load-optim and --no-load-rng)."""
    dist_ckpt_strictness: Literal["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                                  "return_unexpected", "return_all", "ignore_all"] = "assume_ok_unexpected"
    """What --load does with tensors that the checkpoint and this model do not share. A tensor this model needs and the checkpoint lacks is always an error. Tensors the checkpoint holds and the model does not ('unexpected': a checkpoint of a model with more layers or MTP) are ignored (assume_ok_unexpected, ignore_all, and return_*: Megatron-LM hands those to a Python caller that its training discards), listed in the log (log_unexpected; log_all also lists the missing ones before the error), or an error (raise_unexpected, raise_all)."""
    ckpt_format: str = "torch_dist"
    """Checkpoint format: torch_dist (torch.distributed.checkpoint, every rank writing its own shards), the only one megamoe writes."""
    async_save: bool = False
    """Write checkpoints in the background: the tensors are copied to CPU memory, then written by a thread while training goes on (one save in flight at a time; recorded in the tracker only once every rank finished)."""
    ckpt_keep_latest: Optional[int] = None
    """Keep only the latest this many checkpoints in --save (older iteration directories are deleted after a save completes). Unset keeps all."""
    exit_signal_handler: bool = False
    """On SIGTERM (SLURM's preemption signal), save a checkpoint at the end of the current iteration and exit 0."""
    exit_interval: Optional[int] = None
    """Save and exit after the iteration that is a multiple of this."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit once training has run this many minutes (checked after every iteration)."""


@dataclass
class MegatronConfig:
    """Megatron-LM switches for its own kernels and code paths: accepted so that launch scripts
    run unchanged, and no-ops here, each for the reason given."""

    use_mcore_models: bool = False
    """No-op: megamoe has one model implementation (Megatron-LM's flag chose Megatron-Core models over its legacy ones)."""
    no_masked_softmax_fusion: bool = False
    """No-op: attention runs in torch's fused scaled-dot-product kernels; there is no separate masked-softmax kernel to turn off."""
    no_rope_fusion: bool = False
    """No-op: RoPE is plain torch arithmetic, not a fused kernel."""
    no_bias_swiglu_fusion: bool = False
    """No-op: linear layers have no biases, so there is no bias + SwiGLU kernel."""
    no_bias_gelu_fusion: bool = False
    """No-op: linear layers have no biases, so there is no bias + GeLU kernel."""
    no_bias_dropout_fusion: bool = False
    """No-op: linear layers have no biases, so there is no bias + dropout + add kernel."""
    no_gradient_accumulation_fusion: bool = False
    """No-op: weight gradients always accumulate into float32 main-gradient buffers."""
    no_persist_layer_norm: bool = False
    """No-op: norms run torch's kernels."""
    attention_softmax_in_fp32: bool = False
    """No-op: torch's attention kernels accumulate the softmax in float32 whatever the input dtype."""
    use_flash_attn: bool = False
    """No-op: torch's scaled-dot-product attention uses FlashAttention wherever it applies."""
    no_position_embedding: bool = False
    """No-op: megamoe never adds learned absolute position embeddings (Megatron-LM deprecates this flag in favour of --position-embedding-type)."""
    use_pytorch_profiler: bool = False
    """No-op: --profile always writes a torch.profiler trace (and brackets it for nsys too)."""
    moe_permute_fusion: bool = False
    """No-op: the token permutation and un-permutation are always single gathers (Triton kernels on CUDA)."""
    moe_router_fusion: bool = False
    """No-op: the router's scores, top-k and balancing statistics are torch operations, compiled with their block under --compile; there is no separate fused kernel to choose."""
    cross_entropy_loss_fusion: bool = False
    """No-op: the output projection and the cross entropy are always one chunked, fused operation (Triton on CUDA); the full logits are never held."""
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"
    """No-op: the fused output projection and cross entropy are megamoe's own, whichever implementation is named."""
    no_create_attention_mask_in_dataloader: bool = False
    """No-op: the data loader never builds attention masks; attention is causal inside its kernels."""
    enable_experimental: bool = False
    """No-op: megamoe has no experimental gate; each feature is turned on by its own flag."""
    auto_detect_ckpt_format: bool = False
    """No-op: --load reads megamoe's one format (torch_dist) and says so when a directory holds something else; Hugging Face checkpoints go through tools/convert_checkpoint.py."""
    log_throughput: bool = False
    """No-op: the log line always shows tokens/s, TFLOP/s per device and (on GPUs) MFU."""


# Shown under the megatron section of --help: the Megatron-LM structural flags that are megamoe
# fields of other sections.
MEGATRON_STRUCTURAL_FLAGS = (
    "Megatron-LM's structural flags that megamoe builds are fields of the sections above: "
    "--normalization, --norm-epsilon, --swiglu, --position-embedding-type (rope only), --rotary-percent "
    "(1.0 only), --group-query-attention with --num-query-groups, --kv-channels, --qk-layernorm, "
    "--rope-type, --add-bias-linear (refused: no biases), --moe-grouped-gemm, --moe-router-dtype, "
    "--moe-layer-recompute. The switches below are Megatron kernel choices accepted as no-ops, "
    "and three Megatron spellings of megamoe fields."
)

# Megatron-LM's other spellings of megamoe fields: flag -> (field, value it sets, help).
FLAG_ALIASES: dict[str, tuple[str, object, str]] = {
    "--disable-bias-linear": (
        "add_bias_linear", False, "Megatron-LM's spelling of --no-add-bias-linear: no biases in linear layers."),
    "--recompute-activations": (
        "recompute_granularity", "selective", "Megatron-LM's spelling of --recompute-granularity selective."),
    "--moe-router-padding-for-quantization": (
        "moe_router_padding_for_fp8", True, "Megatron-LM's newer spelling of --moe-router-padding-for-fp8."),
}


# Megatron-LM's other names of megamoe fields that take a value: field -> its other flags.
FLAG_SPELLINGS: dict[str, tuple[str, ...]] = {
    "virtual_pipeline_model_parallel_size": ("--num-virtual-stages-per-pipeline-rank",),
}


@dataclass
class Config:
    """The whole configuration, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "megatron": MegatronConfig,
}


class ConfigError(ValueError):
    """A user mistake in flags, a config file or their combination. One line, names the flag."""


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``num_layers`` -> ``--num-layers``."""
    return "--" + field_name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def section_of(field_name: str) -> str:
    """The section that holds a field (field names are unique across sections)."""
    for section, cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(cls)}:
            return section
    raise KeyError(field_name)
