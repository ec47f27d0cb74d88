"""Validation of a :class:`~megamoe.config.Config`, once, section by section.

Every check raises :class:`~megamoe.config.ConfigError` with one line that names the flag(s)
involved. ``validate(config, world_size)`` is called by ``pretrain_moe.py`` before anything
is built; the parallel checks reuse :class:`~megamoe.parallel.state.ParallelLayout`, so the
layout tool and training agree on what is valid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from megamoe.config import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainingConfig,
    flag_name,
)
from megamoe.data.blended_dataset import parse_blend
from megamoe.data.gpt_dataset import split_document_ranges
from megamoe.data.indexed_dataset import exists, idx_path, read_header
from megamoe.data.tokenizers import build_tokenizer
from megamoe.model.args import Recompute, dense_ffn_hidden_size, num_kv_heads, parse_moe_layer_freq
from megamoe.parallel.pipeline_layout import PipelineLayout
from megamoe.parallel.pipeline_parallel import stage_layer_ranges, virtual_stage_layer_ranges
from megamoe.parallel.state import ParallelLayout
from megamoe.batch_schedule import BatchSchedule

# Flags that are declared (so --help lists them and launch scripts parse) but whose feature
# has not landed yet. Setting one to anything but its default is an error, never a no-op.
# Each entry is removed by the change that implements it.
NOT_SUPPORTED_YET: frozenset[str] = frozenset(
    {
        # Megatron-LM's performance machinery megamoe has no counterpart of
        "tp_comm_overlap", "optimizer_cpu_offload", "overlap_cpu_optimizer_d2h_h2d", "moe_flex_dispatcher_backend",
    }
)


def _fail(message: str) -> None:
    raise ConfigError(message)


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            _fail(f"{flag_name(name)} {value}: must be positive")


def check_not_supported_yet(config: Config, unsupported: frozenset[str] = NOT_SUPPORTED_YET) -> None:
    """Refuse a declared-but-unimplemented flag that was set to a non-default value."""
    for section_name, cls in SECTIONS.items():
        section = getattr(config, section_name)
        default = cls()
        for f in dataclasses.fields(cls):
            if f.name in unsupported and getattr(section, f.name) != getattr(default, f.name):
                _fail(f"{flag_name(f.name)}: not supported yet")


def validate_model(m: ModelConfig) -> None:
    _positive(m, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
              "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rotary_base",
              "rotary_seq_len_interpolation_factor")
    _check_megatron_defaults_not_built(m)
    interpolation = m.rotary_seq_len_interpolation_factor
    if interpolation not in (None, 1.0) and (m.rope_type or ("yarn" if m.multi_latent_attention else "rope")) == "yarn":
        _fail(f"--rotary-seq-len-interpolation-factor {interpolation} applies to plain RoPE; YaRN extends the "
              "context with --rotary-scaling-factor")
    if m.group_query_attention and m.multi_latent_attention:
        _fail("--group-query-attention and --multi-latent-attention are alternatives: give one")
    if m.group_query_attention and m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        _fail(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
              f"--num-query-groups {m.num_query_groups}")
    if m.q_lora_rank is not None and m.q_lora_rank < 0:
        _fail(f"--q-lora-rank {m.q_lora_rank}: must be 0 (plain query projection) or positive")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        _fail(f"--max-position-embeddings {m.max_position_embeddings} is shorter than "
              f"--seq-length {m.seq_length}")
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            _fail(f"{flag_name(name)} {getattr(m, name)}: must be in [0, 1)")
    if m.mtp_num_layers < 0:
        _fail(f"--mtp-num-layers {m.mtp_num_layers}: must be 0 or more")
    if m.mtp_num_layers >= m.seq_length:
        _fail(f"--mtp-num-layers {m.mtp_num_layers} must be smaller than --seq-length {m.seq_length}")
    if m.multi_latent_attention:
        if m.qk_pos_emb_head_dim % 2:
            _fail(f"--qk-pos-emb-head-dim {m.qk_pos_emb_head_dim}: must be even (RoPE rotates pairs)")
    else:
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        if head_dim % 2:
            _fail(f"attention head dimension {head_dim} (--kv-channels or --hidden-size / --num-attention-heads) "
                  "must be even (RoPE rotates pairs)")


def _check_megatron_defaults_not_built(m: ModelConfig) -> None:
    """Megatron-LM choices megamoe does not build: asked for, they are an error, never ignored."""
    if m.position_embedding_type not in (None, "rope"):
        _fail(f"--position-embedding-type {m.position_embedding_type}: not supported; megamoe builds rotary "
              "position embeddings only (--position-embedding-type rope, with YaRN scaling by --rope-type yarn)")
    if m.add_bias_linear:
        _fail("--add-bias-linear: not supported; megamoe's linear layers have no biases (--disable-bias-linear)")
    if m.rotary_percent != 1.0:
        _fail(f"--rotary-percent {m.rotary_percent}: not supported; megamoe rotates whole heads (1.0 only)")


def validate_moe(moe: MoEConfig, m: ModelConfig) -> None:
    for name in ("num_experts", "moe_shared_expert_intermediate_size"):  # 0 means none, as unset does
        if (getattr(moe, name) or 0) < 0:
            _fail(f"{flag_name(name)} {getattr(moe, name)}: must be positive, or 0 / None for none")
    if not moe.num_experts:
        return
    _positive(moe, "moe_router_topk", "moe_ffn_hidden_size", "moe_router_num_groups", "moe_router_group_topk",
              "moe_expert_capacity_factor", "moe_router_topk_scaling_factor")
    parse_moe_layer_freq(moe.moe_layer_freq, m.num_layers)
    if moe.moe_router_topk > moe.num_experts:
        _fail(f"--moe-router-topk {moe.moe_router_topk} is larger than --num-experts {moe.num_experts}")
    groups, group_topk = moe.moe_router_num_groups, moe.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        _fail("--moe-router-num-groups and --moe-router-group-topk must be given together")
    if groups is not None:
        if moe.num_experts % groups:
            _fail(f"--num-experts {moe.num_experts} is not divisible by --moe-router-num-groups {groups}")
        if group_topk > groups:
            _fail(f"--moe-router-group-topk {group_topk} is larger than --moe-router-num-groups {groups}")
        if moe.moe_router_topk > group_topk * (moe.num_experts // groups):
            _fail(f"--moe-router-topk {moe.moe_router_topk} exceeds the experts in "
                  f"--moe-router-group-topk {group_topk} groups of {moe.num_experts // groups}")
    if moe.moe_token_dispatcher_type == "flex":
        _fail("--moe-token-dispatcher-type flex: Megatron-LM's DeepEP / HybridEP dispatcher is not built yet; "
              "--moe-token-dispatcher-type alltoall sends the same rows (DISPATCHER=alltoall in its MoE model zoo)")
    _positive(moe, "moe_a2a_overlap_chunks")
    if moe.moe_a2a_overlap_chunks > 1:
        chunks = f"--moe-a2a-overlap-chunks {moe.moe_a2a_overlap_chunks}"
        if moe.moe_token_dispatcher_type != "alltoall":
            _fail(f"{chunks} needs --moe-token-dispatcher-type alltoall")
        if moe.moe_pad_expert_input_to_capacity:
            _fail(f"{chunks} cannot pad each chunk to the micro-batch's capacity: drop it or "
                  "--moe-pad-expert-input-to-capacity")
        if moe.moe_fp8_dispatch:
            _fail(f"{chunks} with --moe-fp8-dispatch is not supported yet: drop one")
    if moe.moe_pad_expert_input_to_capacity and moe.moe_expert_capacity_factor is None:
        _fail("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if moe.moe_aux_loss_coeff < 0 or (moe.moe_z_loss_coeff or 0) < 0:
        _fail("--moe-aux-loss-coeff and --moe-z-loss-coeff must not be negative")
    if moe.expert_backend == "te":
        from megamoe.extensions.te import import_te

        try:
            import_te()
        except ImportError:
            _fail("--moe-grouped-gemm-impl te needs Transformer Engine, which is not installed "
                  "(pip install 'megamoe[te]'), or use --moe-grouped-gemm-impl torch")


def resolve_pipeline_layout(p: ParallelConfig, m: ModelConfig) -> None:
    """``--pipeline-model-parallel-layout``: check it against the model and the pipeline size, and
    take the virtual size from it (as Megatron-LM does)."""
    text = p.pipeline_model_parallel_layout
    if text is None:
        return
    flag = f"--pipeline-model-parallel-layout {text}"
    others = [f for f, given in (("--decoder-first-pipeline-num-layers", p.decoder_first_pipeline_num_layers),
                                 ("--decoder-last-pipeline-num-layers", p.decoder_last_pipeline_num_layers),
                                 ("--num-layers-per-virtual-pipeline-stage", p.num_layers_per_virtual_pipeline_stage))
              if given is not None]
    if others:
        _fail(f"{flag} places every layer itself: drop {others[0]}")
    if p.pipeline_schedule == "dualpipev":
        _fail(f"{flag}: --pipeline-schedule dualpipev places its V itself (with --decoder-first/last-pipeline-num-layers)")
    try:
        layout = PipelineLayout.parse(text)
        layout.check(m.num_layers, m.mtp_num_layers, p.pipeline_model_parallel_size)
    except ValueError as err:
        _fail(f"{flag}: {err} (--num-layers {m.num_layers}, --mtp-num-layers {m.mtp_num_layers}, "
              f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size})")
    vpp = layout.virtual_size(p.pipeline_model_parallel_size)
    given = p.virtual_pipeline_model_parallel_size
    if given not in (None, vpp):
        _fail(f"{flag} has {len(layout.stages)} virtual stages, {vpp} per pipeline rank: "
              f"--virtual-pipeline-model-parallel-size {given} disagrees")
    p.virtual_pipeline_model_parallel_size = vpp


def resolve_virtual_pipeline(p: ParallelConfig, m: ModelConfig) -> None:
    """Turn ``--num-layers-per-virtual-pipeline-stage`` into the virtual size (as Megatron-LM
    does), so the rest of the code reads one field; a virtual size of 1 means no interleaving."""
    per_chunk, vpp = p.num_layers_per_virtual_pipeline_stage, p.virtual_pipeline_model_parallel_size
    if per_chunk is not None:
        if vpp is not None:
            _fail("--num-layers-per-virtual-pipeline-stage and --virtual-pipeline-model-parallel-size "
                  "are alternatives: give one")
        if p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None:
            _fail("--num-layers-per-virtual-pipeline-stage needs even stages: use "
                  "--virtual-pipeline-model-parallel-size with --decoder-first/last-pipeline-num-layers")
        per_stage = m.num_layers // p.pipeline_model_parallel_size
        if per_chunk <= 0 or m.num_layers % p.pipeline_model_parallel_size or per_stage % per_chunk:
            _fail(f"--num-layers-per-virtual-pipeline-stage {per_chunk} does not divide the "
                  f"{m.num_layers / p.pipeline_model_parallel_size:g} layers per stage (--num-layers "
                  f"{m.num_layers}, --pipeline-model-parallel-size {p.pipeline_model_parallel_size})")
        p.virtual_pipeline_model_parallel_size = per_stage // per_chunk
        p.num_layers_per_virtual_pipeline_stage = None
    if p.virtual_pipeline_model_parallel_size == 1:
        p.virtual_pipeline_model_parallel_size = None


def validate_parallel(p: ParallelConfig, m: ModelConfig, moe: MoEConfig, world_size: int) -> ParallelLayout:
    resolve_pipeline_layout(p, m)
    resolve_virtual_pipeline(p, m)
    layout = ParallelLayout.build(world_size, **p.degrees())
    tp = layout.tp
    if m.num_attention_heads % tp:
        _fail(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
              f"--tensor-model-parallel-size {tp}")
    kv_heads = num_kv_heads(m)
    if not m.multi_latent_attention and kv_heads % tp:
        _fail(f"the {kv_heads} key/value heads (--num-query-groups with --group-query-attention) are not "
              f"divisible by --tensor-model-parallel-size {tp}")
    dense_ffn = m.ffn_hidden_size or dense_ffn_hidden_size(m.hidden_size, m.swiglu)
    if dense_ffn % tp:
        _fail(f"--ffn-hidden-size {dense_ffn} is not divisible by --tensor-model-parallel-size {tp}")
    if p.sequence_parallel and m.seq_length % (tp * layout.cp):
        _fail(f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp} x "
              f"--context-parallel-size {layout.cp} (needed by --sequence-parallel)")
    if layout.cp > 1 and m.seq_length % (2 * layout.cp):
        _fail(f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size {layout.cp}")
    if p.cp_comm_type not in ("p2p", "allgather"):
        _fail(f"--cp-comm-type {p.cp_comm_type}: megamoe exchanges context-parallel keys and values with 'p2p' "
              "(a ring) or 'allgather'; the all-to-all variants are not built")
    if layout.cp > 1 and p.cp_comm_type == "p2p" and m.attention_dropout:
        _fail(f"--attention-dropout {m.attention_dropout}: ring context-parallel attention (--cp-comm-type p2p, "
              "the default) has no attention dropout; set --attention-dropout 0 or use --cp-comm-type allgather")
    if not moe.num_experts and layout.ep > 1:
        _fail(f"--expert-model-parallel-size {layout.ep} needs routed experts (--num-experts)")
    if moe.num_experts:
        if tp > 1 and m.seq_length % (tp * layout.cp):
            _fail(f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp} x "
                  f"--context-parallel-size {layout.cp} (MoE layers split each rank's sequence share over "
                  "the TP ranks)")
        if moe.num_experts % layout.ep:
            _fail(f"--num-experts {moe.num_experts} is not divisible by "
                  f"--expert-model-parallel-size {layout.ep}")
        ffn = moe.moe_ffn_hidden_size or dense_ffn
        if ffn % layout.etp:
            _fail(f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {layout.etp}")
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if (first is not None or last is not None) and layout.pp == 1:
        _fail("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    if p.pipeline_schedule == "dualpipev":
        _validate_dualpipev(p, m, layout)
    else:
        _validate_stage_layers(p, m, layout)
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        _fail("--overlap-param-gather needs --use-distributed-optimizer")
    _positive(p, "ddp_bucket_size")
    return layout


def _validate_stage_layers(p: ParallelConfig, m: ModelConfig, layout: ParallelLayout) -> None:
    if p.pipeline_model_parallel_layout is not None:  # checked by resolve_pipeline_layout
        return
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    try:
        ranges = stage_layer_ranges(m.num_layers, layout.pp, first, last)
    except ValueError:
        given = "".join(f" with {flag} {v}" for flag, v in (("--decoder-first-pipeline-num-layers", first),
                                                           ("--decoder-last-pipeline-num-layers", last)) if v is not None)
        _fail(f"--num-layers {m.num_layers} cannot be split over --pipeline-model-parallel-size {layout.pp} "
              f"stages{given} (the other stages must get equal whole numbers of layers)")
    if any(end <= start for start, end in ranges):
        _fail(f"every pipeline stage needs at least one layer (--num-layers {m.num_layers}, "
              f"--pipeline-model-parallel-size {layout.pp})")
    if layout.vpp:
        if layout.pp == 1:
            _fail("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
        try:
            virtual_stage_layer_ranges(m.num_layers, layout.pp, layout.vpp, first, last)
        except ValueError:
            counts = [end - start for start, end in ranges]
            _fail(f"--virtual-pipeline-model-parallel-size {layout.vpp} does not divide the layers of every "
                  f"pipeline stage ({counts}; --num-layers {m.num_layers})")


def _validate_dualpipev(p: ParallelConfig, m: ModelConfig, layout: ParallelLayout) -> None:
    if layout.pp < 2:
        _fail("--pipeline-schedule dualpipev needs --pipeline-model-parallel-size 2 or more")
    if layout.vpp:
        _fail(f"--pipeline-schedule dualpipev places two chunks per rank itself: drop "
              f"--virtual-pipeline-model-parallel-size {layout.vpp}")
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    try:
        ranges = stage_layer_ranges(m.num_layers, 2 * layout.pp, first, last)
    except ValueError:
        ranges = []
    if not ranges or any(end <= start for start, end in ranges):
        _fail(f"--pipeline-schedule dualpipev splits --num-layers {m.num_layers} over 2 x "
              f"--pipeline-model-parallel-size = {2 * layout.pp} stages of at least one layer each, equal but for "
              f"--decoder-first/last-pipeline-num-layers")


def validate_moe_overlap(config: Config, layout: ParallelLayout) -> None:
    """--overlap-moe-expert-parallel-comm: where the pieces it interleaves are built."""
    moe, flag = config.moe, "--overlap-moe-expert-parallel-comm"
    if moe.delay_wgrad_compute and not moe.overlap_moe_expert_parallel_comm:
        _fail(f"--delay-wgrad-compute delays weight gradients inside the pieces of {flag}: give {flag} too")
    if not moe.overlap_moe_expert_parallel_comm:
        return
    if not moe.num_experts or moe.moe_token_dispatcher_type != "alltoall":
        _fail(f"{flag} needs routed experts on --moe-token-dispatcher-type alltoall")
    unsupported = [(f"--moe-a2a-overlap-chunks {moe.moe_a2a_overlap_chunks}", moe.moe_a2a_overlap_chunks > 1),
                   ("--moe-fp8-dispatch", moe.moe_fp8_dispatch), ("--compile", config.training.compile)]
    for other, given in unsupported:
        if given:
            _fail(f"{flag} with {other} is not supported yet: drop one")


def resolve_sample_based_training(t: TrainingConfig, schedule: BatchSchedule) -> None:
    """``--train-samples``: the run's steps (``train_iters``) from the samples, as Megatron-LM
    derives them (walking ``schedule``, the batch sizes); the learning-rate schedule's lengths
    must be given in the same unit as the run's length."""
    _positive(t, "train_samples", "lr_decay_iters", "lr_decay_samples", "global_batch_size")
    for name in ("lr_warmup_iters", "lr_warmup_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples"):
        if (getattr(t, name) or 0) < 0:
            _fail(f"{flag_name(name)} {getattr(t, name)}: must be 0 or more")
    if t.lr_warmup_fraction is not None and not 0 <= t.lr_warmup_fraction <= 1:
        _fail(f"--lr-warmup-fraction {t.lr_warmup_fraction}: must be between 0 and 1")
    samples = t.train_samples is not None
    unit, other = ("samples", "iters") if samples else ("iters", "samples")
    given = [name for name in (f"lr_decay_{other}", f"lr_warmup_{other}", f"lr_wsd_decay_{other}")
             if getattr(t, name)]
    if given:
        how = "sample-based (--train-samples)" if samples else "iteration-based (--train-iters)"
        _fail(f"{flag_name(given[0])}: this run is {how}, so its schedule is given in {unit} "
              f"(--lr-decay-{unit}, --lr-warmup-{unit}, --lr-wsd-decay-{unit})")
    if t.lr_warmup_fraction is not None and getattr(t, f"lr_warmup_{unit}"):
        _fail(f"--lr-warmup-fraction and --lr-warmup-{unit}: give one")
    if samples:
        t.train_iters = schedule.steps_for(t.train_samples)
        if not t.train_iters:
            _fail(f"--train-samples {t.train_samples} is less than one step of --global-batch-size "
                  f"{t.global_batch_size}")


def resolve_batch_schedule(config: Config) -> BatchSchedule:
    """``--step-batch-size-schedule`` or ``--rampup-batch-size``: parsed (the global batch size
    becomes the schedule's last), with Megatron-LM's rules; a constant schedule without them."""
    t = config.training
    if t.step_batch_size_schedule is not None and t.rampup_batch_size is not None:
        _fail("--step-batch-size-schedule and --rampup-batch-size: give one")
    flag = ("--step-batch-size-schedule" if t.step_batch_size_schedule is not None
            else "--rampup-batch-size" if t.rampup_batch_size is not None else None)
    if flag is None:
        return BatchSchedule.constant(t.global_batch_size)
    if t.rampup_batch_size is not None and len(t.rampup_batch_size) != 3:
        _fail(f"--rampup-batch-size {' '.join(map(str, t.rampup_batch_size))}: takes START INCREMENT SAMPLES")
    if t.train_samples is None:  # as Megatron asserts: the schedule is counted in samples
        _fail(f"{flag} needs --train-samples (sample-based training), not --train-iters")
    try:
        schedule = BatchSchedule.of(config)
    except ValueError as err:
        value = t.step_batch_size_schedule if t.rampup_batch_size is None else " ".join(map(str, t.rampup_batch_size))
        _fail(f"{flag} {value!r}: {err}")
    t.global_batch_size = schedule.final
    return schedule


def _check_batch_size(batch: int, which: str, t: TrainingConfig, layout: ParallelLayout, pipeline_schedule: str
                      ) -> None:
    """A global batch of ``batch`` sequences splits into whole micro-batches per data-parallel
    rank, in a count the pipeline schedule can run."""
    if batch % (t.micro_batch_size * layout.dp):
        _fail(f"--global-batch-size {batch}{which} is not divisible by --micro-batch-size "
              f"{t.micro_batch_size} x data-parallel size {layout.dp}")
    num_micro = batch // (t.micro_batch_size * layout.dp)
    if layout.vpp and num_micro % layout.pp:
        _fail(f"the interleaved pipeline (--virtual-pipeline-model-parallel-size {layout.vpp}) needs the "
              f"micro-batches per step ({num_micro} = --global-batch-size {batch}{which} / "
              f"(--micro-batch-size {t.micro_batch_size} x data-parallel size {layout.dp})) to be a multiple "
              f"of --pipeline-model-parallel-size {layout.pp}")
    if pipeline_schedule == "dualpipev" and num_micro < 2 * layout.pp:
        _fail(f"--pipeline-schedule dualpipev needs at least 2 x --pipeline-model-parallel-size = {2 * layout.pp} "
              f"micro-batches per step, got {num_micro} (= --global-batch-size {batch}{which} / "
              f"(--micro-batch-size {t.micro_batch_size} x data-parallel size {layout.dp}))")


def validate_training(config: Config, layout: ParallelLayout) -> None:
    t = config.training
    batches = resolve_batch_schedule(config)
    resolve_sample_based_training(t, batches)
    _positive(t, "micro_batch_size", "global_batch_size", "train_iters", "lr", "eval_interval")
    if t.lr_warmup_init < 0:
        _fail(f"--lr-warmup-init {t.lr_warmup_init}: must be 0 or more")
    if t.manual_gc_interval < 0:
        _fail(f"--manual-gc-interval {t.manual_gc_interval}: must be 0 (never between steps) or more")
    if t.manual_gc_interval and not t.manual_gc:
        _fail(f"--manual-gc-interval {t.manual_gc_interval} has no effect without --manual-gc: give both")
    which = ("" if len(batches.entries) == 1 else " (a --rampup-batch-size batch)" if t.rampup_batch_size
             else " (a --step-batch-size-schedule batch)")
    for batch in dict.fromkeys(batches.sizes):  # each batch size the run steps at
        _check_batch_size(batch, which, t, layout, config.parallel.pipeline_schedule)
    if t.bf16 and t.fp16:
        _fail("--bf16 and --fp16 cannot both be set")
    if t.loss_scale is not None and not (t.fp16 or t.bf16):
        _fail(f"--loss-scale {t.loss_scale}: needs --fp16 or --bf16 (float32 training is not scaled)")
    _positive(t, "loss_scale", "initial_loss_scale", "min_loss_scale")
    if t.min_loss_scale > t.initial_loss_scale:
        _fail(f"--min-loss-scale {t.min_loss_scale} is above --initial-loss-scale {t.initial_loss_scale}")
    for name in ("loss_scale_window", "hysteresis"):
        if getattr(t, name) < 1:
            _fail(f"{flag_name(name)} {getattr(t, name)}: must be at least 1")
    if t.min_lr > t.lr:
        _fail(f"--min-lr {t.min_lr} is larger than --lr {t.lr}")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        _fail("--adam-beta1 and --adam-beta2 must be in [0, 1)")
    if t.clip_grad < 0:
        _fail(f"--clip-grad {t.clip_grad}: must be 0 (off) or positive")


LOCAL_FP8_RECIPES = ("rowwise", "tensorwise")  # megamoe's kernels
TE_FP8_RECIPES = ("delayed", "tensorwise", "blockwise")  # Transformer Engine's


def _recipes_for(what: str, on_te: bool, how: str) -> tuple[tuple[str, ...], str]:
    """The recipes one kind of layer runs, and how to say which layers and why."""
    return (TE_FP8_RECIPES, f"{what} on Transformer Engine ({how})") if on_te else \
        (LOCAL_FP8_RECIPES, f"{what} on megamoe's FP8 kernels ({how})")


def validate_fp8_param_gather(m: ModelConfig, moe: MoEConfig, distributed_optimizer: bool) -> None:
    needs = [what for what, ok in (
        ("--use-distributed-optimizer (its parameter all-gather is what runs in FP8)", distributed_optimizer),
        ("--transformer-impl local", m.transformer_impl == "local"),
        ("experts on megamoe's kernels (--moe-grouped-gemm-impl torch or loop)",
         not moe.num_experts or moe.expert_backend != "te")) if not ok]
    if needs:
        _fail(f"--fp8-param-gather needs {', '.join(needs)}: the distributed optimizer quantizes the weights of "
              "megamoe's own FP8 layers from its masters")


def validate_fp8(m: ModelConfig, moe: MoEConfig, t: TrainingConfig, distributed_optimizer: bool = False) -> None:
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        if getattr(m, name) < 0:
            _fail(f"{flag_name(name)} {getattr(m, name)}: must be 0 or more")
    _positive(m, "fp8_amax_history_len")
    if m.fp8_min_linear_size < 0:
        _fail(f"--fp8-min-linear-size {m.fp8_min_linear_size}: must be 0 or more")
    if m.fp8_min_linear_size and not m.fp8_format:
        _fail("--fp8-min-linear-size: only used with --fp8-format")
    delayed_only = [flag_name(n) for n, default in (("fp8_amax_history_len", 1), ("fp8_amax_compute_algo", "most_recent"),
                                                    ("tp_only_amax_red", False))
                    if getattr(m, n) != default]
    if delayed_only and not (m.fp8_format and m.fp8_recipe == "delayed"):
        _fail(f"{', '.join(delayed_only)}: only used by --fp8-recipe delayed (with --fp8-format)")
    if moe.moe_fp8_dispatch:
        needs = [what for what, ok in (
            ("--fp8-format with --fp8-recipe rowwise", m.fp8_format and m.fp8_recipe == "rowwise"),
            ("megamoe's experts (--moe-grouped-gemm-impl torch or loop)", moe.expert_backend != "te"),
            ("--moe-token-dispatcher-type alltoall", moe.moe_token_dispatcher_type == "alltoall")) if not ok]
        if needs:
            _fail(f"--moe-fp8-dispatch needs {', '.join(needs)}: the rows are quantized rowwise before the all-to-all "
                  "for megamoe's FP8 experts to take as they arrive")
    if not m.fp8_format:
        if m.fp8_param_gather:
            _fail("--fp8-param-gather needs --fp8-format: it gathers the weights of the FP8 layers in FP8")
        return
    if m.fp8_param_gather:
        validate_fp8_param_gather(m, moe, distributed_optimizer)
    if m.fp8_recipe == "mxfp8":
        _fail("--fp8-recipe mxfp8 needs Blackwell GPUs (MXFP8 tensor cores, compute capability 10.0); "
              "on Hopper use --fp8-recipe rowwise or tensorwise, or blockwise with --transformer-impl "
              "transformer_engine")
    parts = [_recipes_for("the linear layers run", m.transformer_impl == "transformer_engine",
                          f"--transformer-impl {m.transformer_impl}")]
    if moe.num_experts:
        parts.append(_recipes_for("the experts run", moe.expert_backend == "te",
                                  f"--moe-grouped-gemm-impl {moe.expert_backend}"))
    for recipes, what in parts:
        if m.fp8_recipe not in recipes:
            _fail(f"--fp8-recipe {m.fp8_recipe}: {what}, which take --fp8-recipe {' or '.join(recipes)}")
    if not t.bf16:
        _fail(f"--fp8-format {m.fp8_format}: needs --bf16 (the FP8 GEMMs take and return bf16 activations)")
    recompute = Recompute.of(m, moe)
    recomputed = [f for f, on in (("--recompute-granularity full", recompute.full),
                                  ("--moe-layer-recompute", recompute.moe),
                                  ("--recompute-modules mlp", recompute.mlp_alone),
                                  ("--recompute-modules shared_experts", recompute.shared_experts_alone)) if on]
    if m.fp8_recipe == "delayed" and recomputed:
        _fail(f"--fp8-recipe delayed with {' and '.join(recomputed)} is not supported yet: the recomputed forward "
              "would enter each amax into the history twice; use --fp8-recipe tensorwise or blockwise")
    if m.transformer_impl == "transformer_engine":
        from megamoe.extensions.te import import_te

        try:
            import_te()
        except ImportError:
            _fail("--transformer-impl transformer_engine needs Transformer Engine, which is not installed "
                  "(pip install 'megamoe[te]'), or use --transformer-impl local")


def validate_data(d: DataConfig, t: TrainingConfig) -> None:
    """Mock vs real data, the dataset files, the split and the tokenizer. Reads only file
    headers (and the tokenizer's model file)."""
    _positive(d, "vocab_size", "make_vocab_size_divisible_by")
    if d.eod_mask_loss and d.uses_mock_data:
        _fail("--eod-mask-loss needs --data-path: mock data has no documents to end")
    if d.num_workers < 0:
        _fail(f"--num-workers {d.num_workers}: must be 0 (batches prepared in the training loop) or more")
    if d.mock_data and d.data_path:
        _fail("--mock-data and --data-path are mutually exclusive (--data-path alone trains on real data)")
    if d.mock_data is False and not d.data_path:
        _fail("--no-mock-data needs --data-path")
    try:
        split_document_ranges(d.split, 1)
    except ValueError as err:
        _fail(str(err))
    if d.model_vocab_size is not None and d.uses_mock_data and d.model_vocab_size < d.vocab_size:
        _fail(f"--model-vocab-size {d.model_vocab_size} is smaller than --vocab-size {d.vocab_size}: mock data "
              "would draw token ids the model has no rows for")
    if d.uses_mock_data:
        if d.tokenizer_type != "NullTokenizer" or d.tokenizer_model is not None:
            _fail("--tokenizer-type and --tokenizer-model apply to --data-path; mock data uses --vocab-size")
        if d.data_cache_path is not None:
            _fail("--data-cache-path applies to --data-path (mock data has no indices to cache)")
        return
    try:
        blend = parse_blend(d.data_path)
    except ValueError as err:
        _fail(str(err))
    for _, prefix in blend:
        if not exists(prefix):
            _fail(f"--data-path {prefix}: {prefix}.bin and {prefix}.idx are needed (made by tools/preprocess_data.py)")
        try:
            _, num_sequences, _ = read_header(idx_path(prefix))
        except ValueError as err:
            _fail(f"--data-path {prefix}: {err}")
        ranges = split_document_ranges(d.split, num_sequences)
        for name, wanted, r in (("training", True, ranges[0]), ("validation", t.eval_iters > 0, ranges[1])):
            if wanted and (r is None or r[0] == r[1]):
                hint = " or set --eval-iters 0" if name == "validation" else ""
                _fail(f"--split {d.split} leaves the {name} split of {prefix} ({num_sequences} documents) "
                      f"empty; give it a larger weight{hint}")
    if d.tokenizer_type == "NullTokenizer":
        if d.tokenizer_model is not None:
            _fail("--tokenizer-model is not used by --tokenizer-type NullTokenizer (which reads --vocab-size)")
    else:
        if d.tokenizer_model is None:
            _fail(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    try:
        build_tokenizer(d)
    except ValueError as err:
        _fail(str(err))
    if d.data_cache_path is not None and os.path.exists(d.data_cache_path) and not os.path.isdir(d.data_cache_path):
        _fail(f"--data-cache-path {d.data_cache_path}: exists and is not a directory")


def validate_logging(log: LoggingConfig, t: TrainingConfig) -> None:
    _positive(log, "log_interval", "moe_expert_load_image_interval")
    if log.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        _fail(f"--wandb-project {log.wandb_project}: the wandb package is not installed (pip install wandb)")
    unused = [flag_name(n) for n in ("wandb_exp_name", "wandb_save_dir", "wandb_entity") if getattr(log, n) is not None]
    if unused and log.wandb_project is None:
        _fail(f"{unused[0]} has no effect without --wandb-project: give the project too")
    if log.profile and not 0 <= log.profile_step_start < log.profile_step_end <= t.train_iters:
        _fail(f"--profile-step-start {log.profile_step_start} and --profile-step-end {log.profile_step_end} must "
              f"satisfy 0 <= start < end <= --train-iters {t.train_iters} (iterations start+1 .. end are profiled)")


def _check_writable(directory: str) -> None:
    """--save must be writable before training starts, not when the first save is due."""
    probe = os.path.join(directory, f".megamoe_write_test.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        _fail(f"--save {directory}: not writable ({err.strerror or err})")


def validate_checkpoint(c: CheckpointConfig) -> None:
    _positive(c, "save_interval")
    _positive(c, "ckpt_keep_latest", "exit_interval", "exit_duration_in_mins")
    if c.save is not None:
        _check_writable(c.save)
    if c.ckpt_format != "torch_dist":
        _fail(f"--ckpt-format {c.ckpt_format}: megamoe reads and writes torch_dist "
              "(torch.distributed.checkpoint) checkpoints only")


def notices(config: Config) -> list[str]:
    """One line for each choice a run relies on without saying so, where Megatron-LM would
    build something else or where a flag has no effect; printed once at start."""
    m, moe, d = config.model, config.moe, config.data
    out = []
    if m.position_embedding_type is None:
        out.append("position embeddings are rotary: Megatron-LM's default, learned absolute embeddings, is not "
                   "built (--position-embedding-type rope says so and silences this)")
    if m.add_bias_linear is None:
        out.append("linear layers have no biases: Megatron-LM's default, --add-bias-linear, is not built "
                   "(--disable-bias-linear says so and silences this)")
    if m.num_query_groups is not None and not m.group_query_attention and not m.multi_latent_attention:
        out.append(f"--num-query-groups {m.num_query_groups} is ignored without --group-query-attention (as in "
                   f"Megatron-LM): attention has {m.num_attention_heads} key/value heads")
    if m.multi_latent_attention and not m.qk_layernorm:
        out.append("multi-latent attention without --qk-layernorm has no latent norms (as in Megatron-LM; "
                   "DeepSeek's models have them)")
    if moe.num_experts and moe.moe_router_pre_softmax and moe.moe_router_score_function != "softmax":
        out.append("--moe-router-pre-softmax has no effect with --moe-router-score-function sigmoid")
    if moe.num_experts and moe.moe_grouped_gemm_impl is None and not moe.moe_grouped_gemm:
        out.append("routed experts run one GEMM per expert (Megatron-LM's default); --moe-grouped-gemm runs "
                   "them as grouped GEMMs")
    if config.checkpoint.save_interval is not None and config.checkpoint.save is None:
        out.append(f"--save-interval {config.checkpoint.save_interval} without --save: nothing is saved "
                   "(as in Megatron-LM)")
    if not d.uses_mock_data:
        vocab = build_tokenizer(d).vocab_size
        if d.vocab_size not in (vocab, DataConfig().vocab_size):
            out.append(f"--vocab-size {d.vocab_size} is replaced by the vocabulary of --tokenizer-model "
                       f"{d.tokenizer_model} ({vocab} ids)")
    return out


# Megatron-LM's --recompute-modules, and the ones megamoe builds
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
BUILT_RECOMPUTE_MODULES = ("core_attn", "moe", "mlp", "shared_experts")


def validate_recompute_modules(m: ModelConfig) -> None:
    """``--recompute-modules``: Megatron-LM's names, the ones megamoe builds, and only with
    selective recomputation (what each means: ``megamoe.model.args.Recompute``)."""
    modules, default = m.recompute_modules, ["core_attn"]
    if modules == default:
        return
    if m.recompute_granularity != "selective":
        _fail(f"--recompute-modules {' '.join(modules)} applies with --recompute-granularity selective "
              f"(this run has {m.recompute_granularity or 'no recomputation'})")
    unknown = [name for name in modules if name not in RECOMPUTE_MODULES]
    if unknown:
        _fail(f"--recompute-modules {unknown[0]}: not a module Megatron-LM recomputes (one of "
              f"{', '.join(RECOMPUTE_MODULES)})")
    unbuilt = [name for name in modules if name not in BUILT_RECOMPUTE_MODULES]
    if unbuilt:
        _fail(f"--recompute-modules {' '.join(unbuilt)}: not supported yet (megamoe recomputes "
              f"{', '.join(BUILT_RECOMPUTE_MODULES)} selectively, or whole layers with --recompute-granularity full)")


def validate_precision_aware_optimizer(t: TrainingConfig) -> None:
    """Megatron-LM's precision-aware optimizer flags: float32 gradients and masters; Adam's
    moments in float32 or bf16, the latter behind --use-precision-aware-optimizer (as Megatron
    asserts) and for AdamW only."""
    for name in ("main_grads_dtype", "main_params_dtype"):
        if getattr(t, name) != "fp32":
            _fail(f"{flag_name(name)} {getattr(t, name)}: not supported yet (megamoe's optimizer keeps gradients "
                  "and master weights in float32)")
    for name in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        dtype = getattr(t, name)
        if dtype in ("fp16", "fp8"):
            _fail(f"{flag_name(name)} {dtype}: not supported yet (it needs a scale per tensor to keep small "
                  "moments from underflowing; bf16 and fp32 are built)")
        if dtype != "fp32" and not t.use_precision_aware_optimizer:
            _fail(f"{flag_name(name)} {dtype} needs --use-precision-aware-optimizer (as in Megatron-LM)")
        if dtype != "fp32" and t.optimizer != "adam":
            _fail(f"{flag_name(name)} {dtype}: Adam's moments only; --optimizer {t.optimizer} keeps its own "
                  "state in float32")


def validate(config: Config, world_size: int) -> ParallelLayout:
    """Check every section and their combinations; return the parallel layout they imply."""
    validate_model(config.model)
    validate_recompute_modules(config.model)
    validate_moe(config.moe, config.model)
    layout = validate_parallel(config.parallel, config.model, config.moe, world_size)
    validate_training(config, layout)
    validate_precision_aware_optimizer(config.training)
    validate_fp8(config.model, config.moe, config.training, config.parallel.use_distributed_optimizer)
    validate_moe_overlap(config, layout)
    validate_data(config.data, config.training)
    validate_logging(config.logging, config.training)
    validate_checkpoint(config.checkpoint)
    validate_muon(config)
    validate_qk_clip(config)
    check_not_supported_yet(config)
    return layout


def validate_qk_clip(config: Config) -> None:
    t = config.training
    if not t.qk_clip:
        return
    if not 0.0 < t.qk_clip_alpha < 1.0:
        _fail(f"--qk-clip-alpha {t.qk_clip_alpha}: must be between 0 and 1 (the query's share of the clip)")
    if t.qk_clip_threshold <= 0:
        _fail(f"--qk-clip-threshold {t.qk_clip_threshold}: must be positive")
    if config.model.qk_layernorm and not config.model.multi_latent_attention:
        _fail("--qk-clip with --qk-layernorm: the per-head query and key norms come after the projections that "
              "qk-clip scales and would undo it; drop one of them (MLA's latent norms are no obstacle)")


def validate_muon(config: Config) -> None:
    t = config.training
    if t.optimizer != "muon":
        return
    if t.muon_tp_mode != "duplicated":
        why = ("orthogonalises each TP shard on its own, so the update would change with the layout"
               if t.muon_tp_mode == "blockwise" else "is not built")
        _fail(f"--muon-tp-mode {t.muon_tp_mode}: megamoe's Muon gathers every TP-cut matrix and orthogonalises it "
              f"whole ('duplicated'); '{t.muon_tp_mode}' {why}")
    if not 0.0 <= t.muon_momentum < 1.0:
        _fail(f"--muon-momentum {t.muon_momentum}: must be in [0, 1)")
    if t.muon_num_ns_steps < 1:
        _fail(f"--muon-num-ns-steps {t.muon_num_ns_steps}: must be at least 1")

