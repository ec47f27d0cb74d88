"""The planner's traffic per group against the bytes a training step's collectives really move
(counted on gloo ranks by wrapping torch.distributed), its step-time arithmetic, and its search."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
import torch.distributed as dist

from megamoe.cli import parse_config
from megamoe.config_validation import validate
from megamoe.parallel import data_parallel, mappings
from megamoe.training.activation_plan import tokens_of
from megamoe.training.comm_plan import step_traffic
from megamoe.training.layout_plan import num_micro_batches, plan_stages, search
from megamoe.training.step_time import RATES, bubble_fraction
from megamoe.parallel.state import ParallelState
from megamoe.testing.ranks import training_rank
from megamoe.training.train import meta_model

BASE = ["--bf16", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8"]


class _SentBytes:
    """Bytes this rank sends per group (by member ranks) through the collectives megamoe calls,
    as ring algorithms move them: an all-gather sends its input to n - 1 ranks, a
    reduce-scatter (n - 1) / n of its input, an all-reduce twice that, an all-to-all the rows
    bound elsewhere, a send its tensor."""

    def __init__(self, monkeypatch):
        self.sent = defaultdict(float)
        me = dist.get_rank()

        def ranks(group):
            return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))

        def wrap(owner, name, count):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                group = kwargs.get("group")
                members = ranks(group)
                self.sent[members] += count(len(members), members, *args, **kwargs)
                return original(*args, **kwargs)
            monkeypatch.setattr(owner, name, counted)

        def all_gather(n, members, out, inp, **kw):
            return (n - 1) * inp.nbytes

        def reduce_scatter(n, members, out, inp, **kw):
            return (n - 1) / n * inp.nbytes

        def all_reduce(n, members, t, *a, **kw):
            return 2 * (n - 1) / n * t.nbytes

        def all_to_all(n, members, out, inp, output_split_sizes=None, input_split_sizes=None, **kw):
            splits = input_split_sizes or [inp.shape[0] // n] * n
            row = inp.nbytes / max(inp.shape[0], 1)
            return row * (sum(splits) - splits[members.index(me)])

        for owner in (mappings, data_parallel):
            wrap(owner, "_all_gather_single", all_gather)
            wrap(owner, "_reduce_scatter_single", reduce_scatter)
        wrap(dist, "all_reduce", all_reduce)
        wrap(dist, "all_to_all_single", all_to_all)
        original_batch = dist.batch_isend_irecv

        def batch(ops):
            for op in ops:  # a pipeline's transfers name no group: the pair of ranks
                if op.op is dist.isend:
                    on_world = op.group is None or op.group is dist.group.WORLD
                    pair = tuple(sorted({me, op.peer})) if on_world else ranks(op.group)
                    self.sent[pair] += op.tensor.nbytes
            return original_batch(ops)
        monkeypatch.setattr(dist, "batch_isend_irecv", batch)


def _sent_and_planned(flags: list[str]) -> tuple[dict, dict]:
    """(bytes sent per group in one training step, the planner's), keyed by member ranks."""
    rank = training_rank(flags)
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = _SentBytes(monkeypatch)
        rank.step()
    state = rank.planning_state
    traffic = step_traffic(rank.config, state, meta_model(rank.config, state), tokens_of(rank.config, state),
                           rank.data.num_micro)
    planned = defaultdict(float)
    for t in traffic:
        planned[t.group.ranks] += t.bytes
    return dict(counter.sent), dict(planned)


LAYOUTS = {
    "tp2,sp,dp2,distopt": ["--config", "examples/configs/demo.yaml", "--tensor-model-parallel-size", "2",
                           "--sequence-parallel", "--use-distributed-optimizer"],
    # the FP8 weights' parameters all-gathered as one byte per element
    "dp4,distopt,fp8-param-gather": ["--config", "examples/configs/demo.yaml", "--use-distributed-optimizer",
                                     "--fp8-format", "hybrid", "--fp8-recipe", "rowwise", "--fp8-param-gather"],
    "ep2,alltoall,pp2": ["--config", "examples/configs/demo.yaml", "--expert-model-parallel-size", "2",
                         "--moe-token-dispatcher-type", "alltoall", "--pipeline-model-parallel-size", "2"],
    "gqa,cp2,ring,tp2": ["--config", "examples/configs/tiny_qwen3_moe.yaml", "--context-parallel-size", "2",
                         "--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_planned_traffic_is_what_the_collectives_send(workers, layout):
    for rank, (sent, planned) in enumerate(workers(4).run(_sent_and_planned, LAYOUTS[layout] + BASE)):
        for group, planned_bytes in planned.items():
            # within 10%: routing at initialisation is not balanced, and the planner leaves out
            # statistics and scalars (the loss, the router's counts, the gradient norm)
            assert planned_bytes == pytest.approx(sent.get(group, 0.0), rel=0.1), (rank, group, sent, planned)
        for group, sent_bytes in sent.items():  # nothing sizeable the planner does not count
            assert group in planned or sent_bytes < 0.02 * sum(sent.values()), (rank, group, sent, planned)


def test_step_time_adds_compute_bubble_and_communication():
    config = parse_config(["--config", "examples/configs/mixtral_8x7b.yaml", "--bf16", "--seq-length", "4096",
                           "--micro-batch-size", "1", "--global-batch-size", "256", "--tensor-model-parallel-size",
                           "2", "--sequence-parallel", "--pipeline-model-parallel-size", "4",
                           "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "1",
                           "--moe-token-dispatcher-type", "alltoall",
                           "--use-distributed-optimizer"])
    layout = validate(config, 64)
    assert num_micro_batches(config, layout) == 256 // 8
    assert bubble_fraction(config, 32) == 3 / 32
    plans = plan_stages(config, layout, gpus_per_node=8)
    for p in plans:
        e = p.step
        assert e.bubble == pytest.approx(e.compute * 3 / 32)
        assert e.total == pytest.approx(e.compute + e.bubble + sum(e.comm.values()))
        # TP 2 and EP 8 stay inside a node (rank order tp-cp-ep-dp-pp), so they run at NVLink rates
        sent = defaultdict(float)
        for t in p.traffic:
            sent[t.kind] += t.bytes
        assert e.comm["tp"] == pytest.approx(sent["tp"] / RATES["nvlink_collective"].value)
        assert e.comm["ep"] == pytest.approx(sent["ep"] / RATES["nvlink_all_to_all"].value)
        # PP 4 is outermost: each stage on its own pair of nodes, neighbours across nodes
        assert all(t.nodes(8) == 4 for t in p.traffic if t.kind == "pp")
        assert e.comm["pp"] == pytest.approx(sent["pp"] / RATES["internode"].value)


def test_muon_adds_newton_schulz_time_divided_over_the_owners():
    """Muon's term: every whole matrix's iteration FLOPs (checked against torch's count in
    test_muon.py) at the measured rate; the distributed optimizer divides it over the owners
    (DP x CP for dense matrices, expert-DP for experts); AdamW adds nothing."""
    from megamoe.training.muon import is_matrix, newton_schulz_flops

    def step(*flags):
        config = parse_config(["--config", "examples/configs/demo.yaml", *BASE, *flags])
        layout = validate(config, 4)
        plan = plan_stages(config, layout, gpus_per_node=4)[0]
        return config, layout, plan.step

    _, _, adam = step("--tensor-model-parallel-size", "2")
    config, layout, muon = step("--tensor-model-parallel-size", "2", "--optimizer", "muon")
    _, _, sharded = step("--tensor-model-parallel-size", "2", "--optimizer", "muon", "--use-distributed-optimizer")
    _, _, low = step("--tensor-model-parallel-size", "2", "--optimizer", "muon", "--muon-fp32-matmul-prec", "low")
    assert adam.optimizer == 0
    state = ParallelState.without_process_groups(layout, 0)
    flops = sum(newton_schulz_flops(p, 5) for p in meta_model(config, state).parameters() if is_matrix(p))
    assert muon.optimizer == pytest.approx(flops / RATES["newton_schulz_medium"].value)
    assert muon.compute == adam.compute and muon.comm["tp"] > adam.comm["tp"]  # plus the matrices' TP gathers
    assert muon.total == pytest.approx(muon.compute + muon.bubble + sum(muon.comm.values()) + muon.optimizer)
    assert sharded.optimizer == pytest.approx(muon.optimizer / 2)  # DP 2 at TP 2; expert-DP 2 as well (EP 1, ETP 2)
    assert low.optimizer == pytest.approx(muon.optimizer * 160 / 277)


def test_search_keeps_only_layouts_that_fit_and_ranks_them():
    base = parse_config(["--config", "examples/configs/demo.yaml", "--bf16", "--seq-length", "64",
                         "--micro-batch-size", "1", "--global-batch-size", "16"])
    everything, tried = search(base, 4, 4, float("inf"))
    assert tried > 10 and len(everything) > 5
    times = [c.step_seconds for c in everything]
    assert times == sorted(times)
    limit = sorted(c.peak for c in everything)[len(everything) // 2]
    some, _ = search(base, 4, 4, limit)
    assert 0 < len(some) < len(everything) and all(c.peak <= limit for c in some)
    for c in some:  # every candidate is a valid layout whose flags rebuild its config
        again = parse_config(["--config", "examples/configs/demo.yaml", "--bf16", "--seq-length", "64",
                              "--micro-batch-size", "1", "--global-batch-size", "16"]
                             + [w for flag in c.flags for w in flag.split()])
        assert dataclasses.asdict(again.parallel) == dataclasses.asdict(c.config.parallel)
        assert validate(again, 4).world_size == 4


def test_recomputation_repeats_a_forward():
    from megamoe.model.args import Recompute, gpt_args
    from megamoe.training.flops import flops_per_token, recomputed_flops_per_token

    config = parse_config(["--config", "examples/configs/deepseek_v2_lite.yaml", "--num-layers", "4",
                           "--moe-layer-freq", "[0]*1+[1]*3"])
    args, seq, vocab = gpt_args(config), config.model.seq_length, 102400
    h, moe = args.hidden_size, args.moe
    head = 3 * 2 * h * vocab  # model FLOPs of the head, which full recompute does not repeat
    # full: one more forward of every block, a third of their forward + backward
    assert recomputed_flops_per_token(args, seq, Recompute(full=True)) == pytest.approx(
        (flops_per_token(args, seq, vocab) - head) / 3)
    # MoE recompute: the three MoE layers' router, routed and shared experts, forward (2 FLOPs per multiply-add)
    per_moe_layer = h * moe.num_experts + 3 * h * (moe.topk * moe.ffn_hidden_size + moe.shared_ffn_hidden_size)
    assert recomputed_flops_per_token(args, seq, Recompute(moe=True)) == 3 * 2 * per_moe_layer
    assert recomputed_flops_per_token(args, seq, Recompute()) == 0
    # --recompute-modules mlp shared_experts: the dense layer's MLP and the three shared experts' MLPs
    mlps = 3 * h * args.ffn_hidden_size + 3 * 3 * h * moe.shared_ffn_hidden_size
    assert recomputed_flops_per_token(args, seq, Recompute(mlp=True, shared_experts=True)) == 2 * mlps
