"""The full model under tensor, expert and data parallelism against the single-process model,
on gloo in float64: per-step loss, aux and z-losses, grad norm, every gradient (shards
gathered), the weights after two optimizer steps and the expert-bias buffers.

Layouts: TP 2 and 4 with and without sequence parallel; EP 2, 4 and 8; EP 2 with expert-TP 2;
the all-to-all in 2 or 3 overlapped chunks at EP 2 and 4 (with expert-TP 2, capacity, padding);
TP 2 for attention with EP 4 for experts (with and without SP); PP 2 and 4 (1F1B), PP 2 x VPP 2
and PP 2 x VPP 4 (interleaved), PP 2 and 4 under DualPipeV (with EP 2), PP 2 and PP 2 x VPP 2 with EP 2 whose steady state runs
forward-backward pairs piece by piece (--overlap-moe-expert-parallel-comm), PP 2 with TP 2 or EP 2,
uneven stages (1 + 3 layers), Megatron's layout strings (uneven, a last stage with only the head,
or the MTP layer and the head, an empty middle virtual stage), and PP 2 x TP 2 x EP 2 on 8 ranks; both token dispatchers. Model variants: sigmoid router with
expert bias, dropless; softmax router with aux and z-loss; group-limited routing with capacity
dropping and MTP; the same with the output head tied to the embedding (under PP the last stage
keeps a copy of the embedding, whose gradient is summed with the first stage's); and a dense
model with Megatron-LM's default structure (LayerNorm, GeLU MLPs, multi-head attention, tied
head) under TP 2 (+SP) and PP 2 (+TP 2 +SP).

The reference is the single-process run of the same model from the same seed, with the whole
global batch's sequences as its micro-batches (gradient accumulation), which is the semantics
the parallel run must reproduce; it is computed once per model and batch in the test process
(every layout of that model shares it), and the first rank of each pipeline stage returns its
stage's global tensors to compare. Tolerance: 1e-9 relative (float64; only the order of
summation differs, plus float32 rotary tables common to both sides)."""

from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch

from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, gather_all, make_config, reduced_main_grads
from megamoe.training.optimizer import MixedPrecisionAdamW
from megamoe.training.train import MicroBatches, build_optimizer, train_step

def _results(model, state, steps) -> dict:
    """What the comparison reads, as global tensors: per step the losses and every gradient,
    then the weights and this stage's buffers."""
    return {"steps": steps,
            "weights": gather_all({name: (p.detach(), p) for name, p in model.named_parameters()}, state),
            "buffers": {name: b.clone() for name, b in model.named_buffers()}}


def _layout_run(variant: str, layout: dict):
    """Two steps in ``layout`` (every rank); the results from the first rank of each pipeline
    stage (every rank of a stage gathers the same global tensors), None from the others."""
    cfg = make_config(variant, layout)
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    steps = []
    for step in range(1, cfg.training.train_iters + 1):
        got = train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro_of(step - 1))], step, cfg,
                         state, None)
        grads = reduced_main_grads(opt)
        steps.append(_step_results(got, gather_all({name: (grads[p], p) for name, p in model.named_parameters()}, state)))
    opt.finish_param_sync()
    results = _results(model, state, steps)
    first_of_stage = all(state.group(kind).rank == 0 for kind in ("tp", "cp", "dp", "ep", "etp", "edp"))
    return results if first_of_stage else None


def _step_results(got, grads: dict) -> dict:
    return {"loss": got.lm_loss, "grad_norm": got.grad_norm, "params_norm": got.params_norm, "num_zeros": got.num_zeros,
            "losses": got.aux_losses + got.z_losses + got.mtp_losses,
            "tokens_per_expert": got.tokens_per_expert, "grads": grads}


@functools.lru_cache(maxsize=None)
def _reference(variant: str, gbs: int, layers: Optional[int], clip: float, iters: int, moments: str,
               batches: Optional[tuple[str, int]]) -> dict:
    """The single-process run of the same model and global batch: one process, the global
    batch's sequences as its micro-batches (gradient accumulation), the whole-tensor optimizer.
    The same for every layout of one model and batch, so it is computed once per session."""
    cfg = make_config(variant, {"gbs": gbs, "clip": clip, "iters": iters, "moments": moments,
                                **({"layers": layers} if layers else {}),
                                **(dict(zip(("batches", "samples"), batches)) if batches else {})})
    single = ParallelState.single()
    model = build(cfg, single)
    opt = MixedPrecisionAdamW(model, cfg.training, single)
    data = MicroBatches(cfg, single, torch.device("cpu"))
    steps = []
    for step in range(1, iters + 1):
        got = train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro_of(step - 1))], step, cfg,
                         single, None)
        steps.append(_step_results(got, {name: p.main_grad.clone() for name, p in model.named_parameters()}))
    return _results(model, single, steps)


def _check_parity(pool, variant: str, layout: dict) -> None:
    """``layout`` against the single-process run, to float64 summation order (TOL)."""
    cfg = make_config(variant, layout)
    want = _reference(variant, cfg.training.global_batch_size, layout.get("layers"), cfg.training.clip_grad,
                      cfg.training.train_iters, cfg.training.exp_avg_dtype,
                      (layout["batches"], layout["samples"]) if "batches" in layout else None)
    stages = [r for r in pool.run(_layout_run, variant, layout) if r is not None]
    assert len(stages) == cfg.parallel.pipeline_model_parallel_size
    for got in stages:
        for step, (g, w) in enumerate(zip(got["steps"], want["steps"]), start=1):
            assert abs(g["loss"] - w["loss"]) <= 1e-9 * abs(w["loss"]), (step, g["loss"], w["loss"])
            assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-9 * w["grad_norm"], (step, g["grad_norm"], w["grad_norm"])
            assert abs(g["params_norm"] - w["params_norm"]) <= 1e-9 * w["params_norm"], (step, g["params_norm"],
                                                                                       w["params_norm"])
            assert g["num_zeros"] == w["num_zeros"], (step, g["num_zeros"], w["num_zeros"])
            for a, b in zip(g["losses"], w["losses"]):
                assert abs(a - b) <= 1e-9 * abs(b) + 1e-15, (step, a, b)
            for name, grad in g["grads"].items():
                torch.testing.assert_close(grad, w["grads"][name], **TOL, msg=f"grad {name} step {step}")
            if g["tokens_per_expert"] is not None:
                assert (g["tokens_per_expert"] == w["tokens_per_expert"]).all()
        for name, weight in got["weights"].items():
            torch.testing.assert_close(weight, want["weights"][name], **TOL, msg=f"weight {name}")
        for name, buffer in got["buffers"].items():  # this stage's buffers: expert bias after the updates
            torch.testing.assert_close(buffer, want["buffers"][name], **TOL, msg=f"buffer {name}")


def _name(case) -> str:
    if isinstance(case, str):
        return case
    return ",".join(k if v is True else f"{k}={v}" for k, v in case.items() if k not in ("gbs", "iters", "samples"))


# (variant, layout) pairs: every layout once, every variant under every dimension; the suite
# must stay fast on two cores, so the full cross product is not run.
TP_CASES = [
    ("mla", dict(tp=2)), ("gqa", dict(tp=2)), ("mtp_capacity", dict(tp=2)),
    ("mla", dict(tp=2, sp=True)), ("gqa", dict(tp=2, sp=True)), ("mtp_capacity", dict(tp=2, sp=True)),
    ("gqa", dict(tp=4)), ("mla", dict(tp=4, sp=True)), ("mtp_capacity", dict(tp=4, sp=True)),
    ("dense", dict(tp=2)), ("dense", dict(tp=2, sp=True)),
]
EP_CASES = [
    (variant, dict(ep=2, dispatcher=dispatcher))
    for variant in ("mla", "gqa", "mtp_capacity") for dispatcher in ("allgather", "alltoall")
] + [
    # pad: each expert's rows padded to 16 (--moe-router-padding-for-fp8) against the unpadded reference
    ("gqa", dict(ep=4, dispatcher="alltoall", pad=True)), ("mtp_capacity", dict(ep=4, dispatcher="allgather")),
    ("mla", dict(ep=2, etp=2, dispatcher="alltoall")), ("mtp_capacity", dict(ep=2, etp=2, dispatcher="allgather")),
    ("gqa", dict(tp=2, ep=4, etp=1, dispatcher="alltoall")),
    ("mtp_capacity", dict(tp=2, ep=4, etp=1, sp=True, dispatcher="alltoall")),
    ("mla", dict(tp=2, ep=4, etp=1, sp=True, dispatcher="allgather", pad=True)),
    # chunks: each MoE layer's tokens in 2 or 3 chunks whose all-to-alls are in flight while the
    # other chunks' experts run (--moe-a2a-overlap-chunks), forward and backward
    ("mla", dict(ep=2, dispatcher="alltoall", chunks=2)),
    ("mtp_capacity", dict(ep=4, dispatcher="alltoall", chunks=3, pad=True)),
    ("gqa", dict(ep=2, etp=2, dispatcher="alltoall", chunks=2)),
    # --overlap-moe-expert-parallel-comm: each micro-batch's forward pieces interleaved with the
    # previous one's backward pieces (2 micro-batches per rank), with TP (+SP), expert-TP, MTP;
    # delay_wgrad: each piece's weight gradients after its backward (--delay-wgrad-compute)
    ("mla", dict(ep=2, dispatcher="alltoall", moe_overlap=True, delay_wgrad=True, gbs=8)),
    ("mtp_capacity", dict(tp=2, sp=True, ep=2, etp=1, dispatcher="alltoall", moe_overlap=True, gbs=8)),
    ("gqa", dict(tp=2, ep=2, etp=2, dispatcher="alltoall", moe_overlap=True, gbs=4)),
    # ... with full recompute inside the pieces (attention half and MLPs between the exchanges)
    ("mtp_capacity", dict(ep=2, dispatcher="alltoall", moe_overlap=True, recompute="full", gbs=8)),
]


@pytest.mark.parametrize("variant, layout", TP_CASES, ids=_name)
def test_tensor_parallel_model_matches_single_process(workers, variant, layout):
    _check_parity(workers(4), variant, layout)


@pytest.mark.parametrize("variant, layout", EP_CASES, ids=_name)
def test_expert_parallel_model_matches_single_process(workers, variant, layout):
    _check_parity(workers(4), variant, layout)


# one expert per rank at 8 ranks, each dispatcher once (both dispatchers run every variant at 4 ranks, above)
@pytest.mark.parametrize("variant, layout", [
    ("mtp_capacity", {"ep": 8, "dispatcher": "allgather", "gbs": 8}),
    ("gqa", {"tp": 2, "ep": 8, "etp": 1, "sp": True, "dispatcher": "alltoall"}),
], ids=_name)
def test_expert_parallel_8_ranks(workers, variant, layout):
    _check_parity(workers(8), variant, layout)


# mtp_tied: MTP and the output head tied to the embedding (the last stage's embedding copy)
PP_CASES = [
    ("mla", dict(pp=2)), ("gqa", dict(pp=2)), ("mtp_tied", dict(pp=2)),
    ("gqa", dict(pp=4)), ("mtp_tied", dict(pp=4)),
    ("mla", dict(pp=2, vpp=2)), ("mtp_tied", dict(pp=2, vpp=2)),
    ("gqa", dict(pp=2, tp=2, sp=True)), ("mtp_tied", dict(pp=2, tp=2, sp=True)),
    ("mla", dict(pp=2, ep=2, dispatcher="alltoall")),
    ("mtp_tied", dict(pp=2, last=3)), ("gqa", dict(pp=2, first=3)),
    # --pipeline-model-parallel-layout: uneven, a last stage with only the head (and MTP), an
    # empty middle virtual stage under interleaving
    ("gqa", dict(pp=2, pp_layout="Et|tttL")), ("mla", dict(pp=2, pp_layout="Etttt|L")),
    ("mtp_tied", dict(pp=2, pp_layout="Etttt|mL")), ("mtp_capacity", dict(pp=2, pp_layout="Et|t||ttmL")),
    ("dense", dict(pp=2)), ("dense", dict(pp=2, tp=2, sp=True)),
    # DualPipeV: the V placement (rank 0 holds the embedding and the tied head), weight gradients
    # of the linears and experts deferred to W actions; 2 x pp micro-batches per rank and more
    ("mtp_tied", dict(pp=2, schedule="dualpipev", gbs=8)),
    ("mla", dict(pp=2, ep=2, dispatcher="alltoall", schedule="dualpipev", gbs=12)),
    ("gqa", dict(pp=4, schedule="dualpipev", layers=8, gbs=8)),
    # and its forward-and-backward pairs overlapped piece by piece (--overlap-moe-expert-parallel-comm)
    ("mtp_tied", dict(pp=2, ep=2, dispatcher="alltoall", schedule="dualpipev", moe_overlap=True, gbs=12)),
    # 1F1B and interleaved 1F1B with their steady state in overlapped forward-backward pairs
    ("mla", dict(pp=2, ep=2, dispatcher="alltoall", moe_overlap=True, moe_recompute=True, gbs=12)),
    ("mtp_tied", dict(pp=2, vpp=2, ep=2, dispatcher="alltoall", moe_overlap=True, delay_wgrad=True, gbs=16)),
]


@pytest.mark.parametrize("variant, layout", PP_CASES, ids=_name)
def test_pipeline_parallel_model_matches_single_process(workers, variant, layout):
    _check_parity(workers(4), variant, layout)


# seq_aux_position: sequence-level balancing loss and first-come capacity, both of which must
# see whole sequences although CP shards them. The ring (--cp-comm-type p2p) is the default;
# cp_comm="allgather" runs the all-gather exchange.
CP_CASES = [
    ("mla", dict(cp=2)), ("gqa", dict(cp=2)), ("mtp_capacity", dict(cp=2)), ("seq_aux_position", dict(cp=2)),
    ("mla", dict(cp=4)), ("seq_aux_position", dict(cp=4)),
    ("gqa", dict(cp=2, tp=2, sp=True)), ("mtp_capacity", dict(cp=2, tp=2, sp=True)),
    ("seq_aux_position", dict(cp=2, tp=2)),
    ("mla", dict(cp=2, ep=2, dispatcher="alltoall")), ("seq_aux_position", dict(cp=2, ep=2, dispatcher="allgather")),
    ("mla", dict(cp=2, cp_comm="allgather")), ("gqa", dict(cp=2, tp=2, sp=True, cp_comm="allgather")),
    ("mla", dict(cp=4, cp_comm="allgather")),
]


@pytest.mark.parametrize("variant, layout", CP_CASES, ids=_name)
def test_context_parallel_model_matches_single_process(workers, variant, layout):
    _check_parity(workers(4), variant, layout)


def test_interleaved_pipeline_four_virtual_stages_per_rank(workers):
    # 8 layers over pp 2 x vpp 4: every virtual stage holds one layer; 4 micro-batches per step
    _check_parity(workers(2), "mtp_tied", {"pp": 2, "vpp": 4, "layers": 8})


def test_pipeline_tensor_expert_8_ranks(workers):
    layout = {"pp": 2, "tp": 2, "ep": 2, "dispatcher": "alltoall", "sp": True}
    _check_parity(workers(8), "mla", layout)


def test_dualpipev_with_expert_parallel_8_ranks(workers):
    # PP 4 (8 virtual stages of one layer) x EP 2 (all-to-all), 8 micro-batches per rank; two
    # steps (the slowest case on two cores)
    layout = {"pp": 4, "ep": 2, "dispatcher": "alltoall", "schedule": "dualpipev", "layers": 8, "gbs": 16,
              "iters": 2}
    _check_parity(workers(8), "mtp_capacity", layout)


def test_every_dimension_at_once_8_ranks(workers):
    # attention: TP 2 (+SP) x CP 2 x PP 2; experts: EP 2 x expert-DP 2 (expert-TP 1); MLA + MTP +
    # capacity; the distributed optimizer shards dense weights over DP x CP = 2 and experts over
    # expert-DP 2, with overlapped reduction in several buckets
    layout = {"tp": 2, "sp": True, "cp": 2, "pp": 2, "ep": 2, "etp": 1, "dispatcher": "alltoall",
              "distopt": True, "overlap": True, "gather": True, "bucket": 50_000}
    _check_parity(workers(8), "mtp_capacity", layout)


# Data parallel (DP = world / model-parallel size): bucketed main gradients, reduced after
# backward or overlapped with it (--overlap-grad-reduce), whole optimizer or ZeRO-1
# (--use-distributed-optimizer, + --overlap-param-gather). Buckets of 50k elements (the model has 1.1M) give each
# buffer several buckets. With the distributed optimizer the gradients compared are the summed
# shards, all-gathered; the weights after two steps check the sharded update and the gather.
B = 50_000
DP_LAYOUTS = [
    (2, "mla", dict(bucket=B)),  # dp 2, 2 micro-batches per rank
    # the global batch grows from 4 to 8 sequences after 64 tokens (--step-batch-size-schedule):
    # 2 then 4 micro-batches per rank, each step's count known to the overlapped reduction
    (2, "mla", dict(overlap=True, bucket=B, batches="0:4 64:8", samples=12)),
    (2, "mla", dict(distopt=True, bucket=B)),
    (2, "mla", dict(distopt=True, overlap=True, gather=True, bucket=B)),
    # 4 micro-batches, clipped; Adam's moments in bf16 (rounded alike whatever the shard)
    (2, "gqa", dict(distopt=True, overlap=True, bucket=B, gbs=8, clip=0.05, moments="bf16")),
    (4, "mla", dict(bucket=B)),  # dp 4, 1 micro-batch per rank
    (4, "mla", dict(overlap=True, bucket=B)),
    (4, "mla", dict(distopt=True)),  # default bucket size: one bucket per buffer
    (4, "mla", dict(distopt=True, overlap=True, bucket=B)),
    (4, "mla", dict(ep=2, dispatcher="alltoall", distopt=True, overlap=True, bucket=B)),  # experts over edp 2
    (4, "mla", dict(tp=2, sp=True, distopt=True, overlap=True, bucket=B)),  # SP weights: TP then DP
    (4, "mtp_tied", dict(pp=2, distopt=True, overlap=True, gather=True, bucket=B, gbs=8)),  # 1F1B, embd
    (4, "mtp_tied", dict(pp=2, vpp=2, distopt=True, overlap=True, bucket=B, gbs=8)),  # interleaved
    (4, "mla", dict(pp=2, schedule="dualpipev", distopt=True, overlap=True, bucket=B, gbs=8)),  # deferred W
]


@pytest.mark.parametrize("world, variant, layout", DP_LAYOUTS, ids=lambda x: _name(x) if not isinstance(x, int) else str(x))
def test_data_parallel_matches_single_process(workers, world, variant, layout):
    _check_parity(workers(world), variant, layout)
