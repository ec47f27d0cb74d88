"""Shared by the parity and checkpoint tests: a small model config for a named variant and a
layout, the float64 model builder, and the global tensors of any layout's parameters (through
their specs), to compare with the single-process model."""

from __future__ import annotations

import torch

from megamoe.config import Config
from megamoe.model.gpt import GPTModel
from megamoe.parallel import mappings
from megamoe.parallel.param_spec import assemble_global, owned_part, spec_of
from megamoe.config_validation import (resolve_batch_schedule, resolve_pipeline_layout,
                                       resolve_sample_based_training, resolve_virtual_pipeline)
from megamoe.parallel.state import ParallelState
from megamoe.testing.presets import preset
from megamoe.training.distributed_optimizer import DistributedOptimizer
from megamoe.training.train import build_model

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


def make_config(variant: str, layout: dict) -> Config:
    cfg = preset("demo")
    cfg.model.seq_length = 16
    if "layers" in layout:  # the first layer dense, the rest MoE
        cfg.model.num_layers = layout["layers"]
        cfg.moe.moe_layer_freq = f"[0]*1+[1]*{layout['layers'] - 1}"
    cfg.training.micro_batch_size = 1
    cfg.training.global_batch_size = layout.get("gbs", 4)  # one sequence per micro-batch
    cfg.training.train_iters = layout.get("iters", 2)  # the second step runs from updated weights and states
    cfg.training.clip_grad = layout.get("clip", 0.0)
    if "batches" in layout:  # --step-batch-size-schedule (tokens), over --train-samples
        cfg.training.step_batch_size_schedule, cfg.training.train_samples = layout["batches"], layout["samples"]
        cfg.training.lr_warmup_iters = 0  # a sample-based run (the preset's is unused then): none
        resolve_sample_based_training(cfg.training, resolve_batch_schedule(cfg))  # the global batch, the steps
    if "moments" in layout:  # Adam's moments in this dtype (--exp-avg-dtype, --exp-avg-sq-dtype)
        cfg.training.use_precision_aware_optimizer = True
        cfg.training.exp_avg_dtype = cfg.training.exp_avg_sq_dtype = layout["moments"]
    # compared with the single process's, as the grad norm is
    cfg.logging.log_params_norm = cfg.logging.log_num_zeros_in_grad = True
    cfg.parallel.tensor_model_parallel_size = layout.get("tp", 1)
    cfg.parallel.sequence_parallel = layout.get("sp", False)
    cfg.parallel.expert_model_parallel_size = layout.get("ep", 1)
    cfg.parallel.pipeline_model_parallel_size = layout.get("pp", 1)
    cfg.parallel.context_parallel_size = layout.get("cp", 1)
    cfg.parallel.cp_comm_type = layout.get("cp_comm", "p2p")
    cfg.parallel.virtual_pipeline_model_parallel_size = layout.get("vpp")
    cfg.parallel.decoder_first_pipeline_num_layers = layout.get("first")
    cfg.parallel.decoder_last_pipeline_num_layers = layout.get("last")
    cfg.parallel.pipeline_model_parallel_layout = layout.get("pp_layout")
    cfg.parallel.pipeline_schedule = layout.get("schedule", "1f1b")
    cfg.parallel.expert_tensor_parallel_size = layout.get("etp")
    cfg.moe.moe_token_dispatcher_type = layout.get("dispatcher", "allgather")
    cfg.moe.moe_router_padding_for_fp8 = layout.get("pad", False)
    cfg.moe.moe_a2a_overlap_chunks = layout.get("chunks", 1)
    cfg.moe.overlap_moe_expert_parallel_comm = layout.get("moe_overlap", False)
    cfg.moe.delay_wgrad_compute = layout.get("delay_wgrad", False)
    cfg.model.recompute_granularity = layout.get("recompute")
    cfg.moe.moe_layer_recompute = layout.get("moe_recompute", False)
    cfg.parallel.use_distributed_optimizer = layout.get("distopt", False)
    cfg.parallel.overlap_grad_reduce = layout.get("overlap", False)
    cfg.parallel.overlap_param_gather = layout.get("gather", False)
    cfg.parallel.ddp_bucket_size = layout.get("bucket")
    if variant in ("gqa", "seq_aux_position"):  # GQA, softmax router, balancing losses
        cfg.model.multi_latent_attention, cfg.model.qk_layernorm = False, False
        cfg.model.num_attention_heads, cfg.model.group_query_attention = 8, True
        cfg.model.num_query_groups = 4 if variant == "gqa" else 2
        cfg.moe.moe_router_score_function = "softmax"
        cfg.moe.moe_router_enable_expert_bias = False
        cfg.moe.moe_aux_loss_coeff = 1e-2
    if variant == "gqa":
        cfg.moe.moe_router_load_balancing_type = "aux_loss"
        cfg.moe.moe_z_loss_coeff = 1e-3
    elif variant == "seq_aux_position":  # per-sequence balancing and first-come capacity see whole sequences
        cfg.moe.moe_router_load_balancing_type = "seq_aux_loss"
        cfg.moe.moe_expert_capacity_factor = 1.0
        cfg.moe.moe_token_drop_policy = "position"
    elif variant == "dense":  # Megatron-LM's default GPT: no experts, LayerNorm, GeLU, MHA, tied head
        cfg.moe.num_experts = None
        cfg.model.multi_latent_attention, cfg.model.qk_layernorm = False, False
        cfg.model.normalization, cfg.model.swiglu, cfg.model.ffn_hidden_size = "LayerNorm", False, None
        cfg.model.untie_embeddings_and_output_weights = False
    elif variant in ("mtp_capacity", "mtp_tied"):
        cfg.model.mtp_num_layers = 1
        cfg.model.untie_embeddings_and_output_weights = variant != "mtp_tied"
        cfg.model.q_lora_rank = 0
        cfg.moe.moe_expert_capacity_factor = 1.0
        cfg.moe.moe_router_num_groups, cfg.moe.moe_router_group_topk = 4, 2
    if cfg.parallel.pipeline_model_parallel_layout is not None:  # checked against the variant's model
        resolve_pipeline_layout(cfg.parallel, cfg.model)  # and the virtual size it implies
        resolve_virtual_pipeline(cfg.parallel, cfg.model)
    return cfg


def build(cfg: Config, state: ParallelState) -> GPTModel:
    return build_model(cfg, state, "cpu", dtype=DT)


def gather_full(t: torch.Tensor, param: torch.nn.Parameter, state: ParallelState) -> torch.Tensor:
    """The global tensor of ``param`` (the weight or its gradient), from its pieces on this
    stage's ranks, as the parameter's spec places them."""
    return assemble_global(t, spec_of(param), state)


def gather_all(named: dict[str, tuple[torch.Tensor, torch.nn.Parameter]], state: ParallelState) -> dict:
    """:func:`gather_full` of every ``name: (tensor, param)`` at once: one all-reduce per group
    kind and dtype, not one per tensor (a collective costs the CPU tests' ranks milliseconds)."""
    fulls, keys = {}, {}
    for name, (t, param) in named.items():
        spec = spec_of(param)
        fulls[name], keys[name] = owned_part(t, spec, state), (spec.stage_groups(), t.dtype)
    for key in dict.fromkeys(keys.values()):  # in parameter order: the same on every rank
        names = [name for name in fulls if keys[name] == key]
        flat = torch.cat([fulls[name].reshape(-1) for name in names])
        for kind in key[0]:  # each element has one owner: the sums are exact
            mappings.all_reduce_(flat, state.group(kind))
        for name, piece in zip(names, flat.split([fulls[name].numel() for name in names])):
            fulls[name] = piece.view_as(fulls[name])
    return fulls


def reduced_main_grads(opt) -> dict:
    """Every parameter's summed main gradient. The distributed optimizer sums only this rank's
    shard of each bucket, so the summed shards are all-gathered."""
    if not isinstance(opt, DistributedOptimizer):
        return {p: p.main_grad for p in opt.params}
    grads = {}
    for bucket in opt.grads.buckets:
        full = mappings.all_gather(bucket.shard(bucket.grad_data).clone(), bucket.group)
        grads.update({p: full[lo:hi].view_as(p) for p, lo, hi in bucket.ranges})
    return grads


def every_rank_micro_batches(data, state: ParallelState, step: int) -> list:
    """Step ``step``'s micro-batches of every data-parallel rank, in rank order: what the
    single-process reference runs as its own micro-batches (gradient accumulation)."""
    mine, out = data.dp_rank, []
    for d in range(state.dp.size):
        data.dp_rank = d
        out += [data.get(step - 1, j) for j in range(data.num_micro_of(step - 1))]
    data.dp_rank = mine
    return out
