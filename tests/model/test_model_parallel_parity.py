"""The full model under tensor, expert and data parallelism against the single-process model,
on gloo in float64: per-step loss, aux and z-losses, grad norm, every gradient (shards
gathered), the weights after three optimizer steps and the expert-bias buffers.

Layouts: TP 2 and 4 with and without sequence parallel; EP 2, 4 and 8; EP 2 with expert-TP 2;
the all-to-all in 2 or 3 overlapped chunks at EP 2 and 4 (with expert-TP 2, capacity, padding);
TP 2 for attention with EP 4 for experts (with and without SP); PP 2 and 4 (1F1B), PP 2 x VPP 2
and PP 2 x VPP 4 (interleaved), PP 2 and 4 under DualPipeV (with EP 2), PP 2 with TP 2 or EP 2,
uneven stages (1 + 3 layers), and PP 2 x TP 2 x EP 2 on 8 ranks; both token dispatchers. Model variants: sigmoid router with
expert bias, dropless; softmax router with aux and z-loss; group-limited routing with capacity
dropping and MTP; the same with the output head tied to the embedding (under PP the last stage
keeps a copy of the embedding, whose gradient is summed with the first stage's); and a dense
model with Megatron-LM's default structure (LayerNorm, GeLU MLPs, multi-head attention, tied
head) under TP 2 (+SP) and PP 2 (+TP 2 +SP).

Every rank also builds the single-process reference from the same seed. The reference runs the
data-parallel ranks' micro-batches as its own micro-batches (gradient accumulation), which is
the semantics the parallel run must reproduce. Tolerance: 1e-9 relative (float64; only the
order of summation differs, plus float32 rotary tables common to both sides)."""

from __future__ import annotations

import copy

import pytest
import torch

from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, every_rank_micro_batches, gather_full, make_config, reduced_main_grads
from megamoe.training.optimizer import MixedPrecisionAdamW
from megamoe.training.train import MicroBatches, build_optimizer, train_step

def _parity(variant: str, layout: dict):
    cfg = make_config(variant, layout)
    p = cfg.parallel
    state = ParallelState.build(**p.degrees())
    single = ParallelState.single()
    ref_base = copy.deepcopy(cfg)
    ref_base.moe.moe_router_padding_for_fp8 = False  # the reference never pads (layout key "pad")
    model, ref = build(cfg, state), build(ref_base, single)
    opt, ref_opt = build_optimizer(model, cfg, state), MixedPrecisionAdamW(ref, cfg.training, single)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    for step in range(1, cfg.training.train_iters + 1):
        mine = [data.get(step - 1, j) for j in range(data.num_micro)]
        everyone = every_rank_micro_batches(data, state, step)  # the reference reads every DP rank's
        got = train_step(model, opt, mine, step, cfg, state, None)
        ref_cfg = make_config(variant, {"gbs": cfg.training.global_batch_size, "layers": cfg.model.num_layers,
                                        "clip": cfg.training.clip_grad, "iters": cfg.training.train_iters})
        want = train_step(ref, ref_opt, everyone, step, ref_cfg, single, None)
        assert abs(got.lm_loss - want.lm_loss) <= 1e-9 * abs(want.lm_loss), (step, got.lm_loss, want.lm_loss)
        assert abs(got.grad_norm - want.grad_norm) <= 1e-9 * want.grad_norm, (step, got.grad_norm, want.grad_norm)
        for a, b in zip(got.aux_losses + got.z_losses + got.mtp_losses, want.aux_losses + want.z_losses + want.mtp_losses):
            assert abs(a - b) <= 1e-9 * abs(b) + 1e-15, (step, a, b)
        ref_params, grads = dict(ref.named_parameters()), reduced_main_grads(opt)
        for name, p in model.named_parameters():
            ref_p = ref_params[name]
            torch.testing.assert_close(gather_full(grads[p], p, state), gather_full(ref_p.main_grad, ref_p, single), **TOL,
                                       msg=f"grad {name} step {step}")
        if got.tokens_per_expert is not None:
            assert (got.tokens_per_expert == want.tokens_per_expert).all()
    opt.finish_param_sync()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        ref_p = ref_params[name]
        torch.testing.assert_close(gather_full(p.detach(), p, state), gather_full(ref_p.detach(), ref_p, single), **TOL,
                                   msg=f"weight {name}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():  # this stage's buffers: expert bias after the updates
        torch.testing.assert_close(b, ref_buffers[name], **TOL, msg=f"buffer {name}")
    return True


def _name(case) -> str:
    if isinstance(case, str):
        return case
    return ",".join(k if v is True else f"{k}={v}" for k, v in case.items() if k not in ("gbs", "iters"))


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
    # previous one's backward pieces (2 micro-batches per rank), with TP (+SP), expert-TP, MTP
    ("mla", dict(ep=2, dispatcher="alltoall", moe_overlap=True, gbs=8)),
    ("mtp_capacity", dict(tp=2, sp=True, ep=2, etp=1, dispatcher="alltoall", moe_overlap=True, gbs=8)),
    ("gqa", dict(tp=2, ep=2, etp=2, dispatcher="alltoall", moe_overlap=True, gbs=4)),
]


@pytest.mark.parametrize("variant, layout", TP_CASES, ids=_name)
def test_tensor_parallel_model_matches_single_process(workers, variant, layout):
    assert all(workers(4).run(_parity, variant, layout))


@pytest.mark.parametrize("variant, layout", EP_CASES, ids=_name)
def test_expert_parallel_model_matches_single_process(workers, variant, layout):
    assert all(workers(4).run(_parity, variant, layout))


# one expert per rank at 8 ranks, each dispatcher once (both dispatchers run every variant at 4 ranks, above)
@pytest.mark.parametrize("variant, layout", [
    ("mtp_capacity", {"ep": 8, "dispatcher": "allgather", "gbs": 8}),
    ("gqa", {"tp": 2, "ep": 8, "etp": 1, "sp": True, "dispatcher": "alltoall"}),
], ids=_name)
def test_expert_parallel_8_ranks(workers, variant, layout):
    assert all(workers(8).run(_parity, variant, layout))


# mtp_tied: MTP and the output head tied to the embedding (the last stage's embedding copy)
PP_CASES = [
    ("mla", dict(pp=2)), ("gqa", dict(pp=2)), ("mtp_tied", dict(pp=2)),
    ("gqa", dict(pp=4)), ("mtp_tied", dict(pp=4)),
    ("mla", dict(pp=2, vpp=2)), ("mtp_tied", dict(pp=2, vpp=2)),
    ("gqa", dict(pp=2, tp=2, sp=True)), ("mtp_tied", dict(pp=2, tp=2, sp=True)),
    ("mla", dict(pp=2, ep=2, dispatcher="alltoall")),
    ("mtp_tied", dict(pp=2, last=3)), ("gqa", dict(pp=2, first=3)),
    ("dense", dict(pp=2)), ("dense", dict(pp=2, tp=2, sp=True)),
    # DualPipeV: the V placement (rank 0 holds the embedding and the tied head), weight gradients
    # of the linears and experts deferred to W actions; 2 x pp micro-batches per rank and more
    ("mtp_tied", dict(pp=2, schedule="dualpipev", gbs=8)),
    ("mla", dict(pp=2, ep=2, dispatcher="alltoall", schedule="dualpipev", gbs=12)),
    ("gqa", dict(pp=4, schedule="dualpipev", layers=8, gbs=8)),
    # and its forward-and-backward pairs overlapped piece by piece (--overlap-moe-expert-parallel-comm)
    ("mtp_tied", dict(pp=2, ep=2, dispatcher="alltoall", schedule="dualpipev", moe_overlap=True, gbs=12)),
]


@pytest.mark.parametrize("variant, layout", PP_CASES, ids=_name)
def test_pipeline_parallel_model_matches_single_process(workers, variant, layout):
    assert all(workers(4).run(_parity, variant, layout))


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
    assert all(workers(4).run(_parity, variant, layout))


def test_interleaved_pipeline_four_virtual_stages_per_rank(workers):
    # 8 layers over pp 2 x vpp 4: every virtual stage holds one layer; 4 micro-batches per step
    assert all(workers(2).run(_parity, "mtp_tied", {"pp": 2, "vpp": 4, "layers": 8}))


def test_pipeline_tensor_expert_8_ranks(workers):
    layout = {"pp": 2, "tp": 2, "ep": 2, "dispatcher": "alltoall", "sp": True}
    assert all(workers(8).run(_parity, "mla", layout))


def test_dualpipev_with_expert_parallel_8_ranks(workers):
    # PP 4 (8 virtual stages of one layer) x EP 2 (all-to-all), 8 micro-batches per rank; two
    # steps (the slowest case on two cores)
    layout = {"pp": 4, "ep": 2, "dispatcher": "alltoall", "schedule": "dualpipev", "layers": 8, "gbs": 16,
              "iters": 2}
    assert all(workers(8).run(_parity, "mtp_capacity", layout))


def test_every_dimension_at_once_8_ranks(workers):
    # attention: TP 2 (+SP) x CP 2 x PP 2; experts: EP 2 x expert-DP 2 (expert-TP 1); MLA + MTP +
    # capacity; the distributed optimizer shards dense weights over DP x CP = 2 and experts over
    # expert-DP 2, with overlapped reduction in several buckets
    layout = {"tp": 2, "sp": True, "cp": 2, "pp": 2, "ep": 2, "etp": 1, "dispatcher": "alltoall",
              "distopt": True, "overlap": True, "gather": True, "bucket": 50_000}
    assert all(workers(8).run(_parity, "mtp_capacity", layout))


# Data parallel (DP = world / model-parallel size): bucketed main gradients, reduced after
# backward or overlapped with it (--overlap-grad-reduce), whole optimizer or ZeRO-1
# (--use-distributed-optimizer, + --overlap-param-gather). Buckets of 50k elements (the model has 1.1M) give each
# buffer several buckets. With the distributed optimizer the gradients compared are the summed
# shards, all-gathered; the weights after three steps check the sharded update and the gather.
B = 50_000
DP_LAYOUTS = [
    (2, "mla", dict(bucket=B)),  # dp 2, 2 micro-batches per rank
    (2, "mla", dict(overlap=True, bucket=B)),
    (2, "mla", dict(distopt=True, bucket=B)),
    (2, "mla", dict(distopt=True, overlap=True, gather=True, bucket=B)),
    (2, "gqa", dict(distopt=True, overlap=True, bucket=B, gbs=8, clip=0.05)),  # 4 micro-batches, clipped
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
    assert all(workers(world).run(_parity, variant, layout))
