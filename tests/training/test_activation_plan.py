"""The planner's activation model against the tensors a forward leaves alive (counted by
LiveBytes on gloo ranks), in layouts that shard them differently, and its micro-batches in
flight against the pipeline schedules' published counts."""

from __future__ import annotations

import pytest
import torch

from megamoe.cli import parse_config
from megamoe.config_validation import validate
from megamoe.model.gpt import LossWeights
from megamoe.parallel.pipeline_parallel import build_schedule
from megamoe.parallel.state import ParallelState
from megamoe.testing.live_bytes import LiveBytes
from megamoe.testing.ranks import training_rank
from megamoe.training.activation_plan import _simulate, stage_plan

# 128 tokens a micro-batch: large enough that per-tensor overheads are small, small enough to be quick
BASE = ["--bf16", "--seq-length", "64", "--micro-batch-size", "2"]


def _kept_and_predicted(flags: list[str]) -> tuple[int, int]:
    """(bytes one forward of one micro-batch left alive on this rank, the planner's prediction)."""
    rank = training_rank(flags)
    config, state, model = rank.config, rank.state, rank.model
    model.train()
    generator = torch.Generator().manual_seed(0)  # the same sequences on every rank
    shape = (config.training.micro_batch_size, config.model.seq_length)
    tokens = torch.randint(0, config.data.vocab_size, shape, generator=generator)
    labels = torch.randint(0, config.data.vocab_size, shape, generator=generator)
    # routing at initialisation is not balanced over 128 tokens: count the rows this rank's
    # experts receive and give the planner their ratio to the balanced mean
    rows, balanced = [], []
    for moe in model.moe_layers():
        moe.experts.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
        balanced.append(moe.gate.topk * state.etp.size * (shape[0] * shape[1] // state.cp.size // state.tp.size))
    with LiveBytes() as live:
        if config.moe.overlap_moe_expert_parallel_comm:  # the forward as the pieces a pair interleaves
            weights = LossWeights(lm=1.0, mtp=[1.0] * len(model.mtp), balance=1.0)
            out = model.piece_run(tokens, labels, None, rank.rng, None, 0, weights)
            out.forward()
        else:
            out = model(tokens, labels, rng_tracker=rank.rng)
    kept = live.current
    del out
    load = sum(rows) / sum(balanced) if balanced else 1.0
    plan = stage_plan(config, rank.planning_state, num_micro=1, cpu=True, expert_load=load)
    return kept, sum(plan.chunk_bytes)


LAYOUTS = {
    # MLA with query LoRA, a dense layer, MoE with a shared expert (the demo model)
    "mla": (1, ["--config", "examples/configs/demo.yaml"]),
    "mla,full-recompute": (1, ["--config", "examples/configs/demo.yaml", "--recompute-granularity", "full"]),
    "mla,moe-recompute": (1, ["--config", "examples/configs/demo.yaml", "--moe-layer-recompute"]),
    # --recompute-modules: the dense MLP and the shared experts alone (with the attention core)
    "mla,recompute-modules": (1, ["--config", "examples/configs/demo.yaml", "--recompute-granularity", "selective",
                                  "--recompute-modules", "core_attn", "mlp", "shared_experts"]),
    "mla,tp2,sp,recompute-modules": (2, ["--config", "examples/configs/demo.yaml", "--tensor-model-parallel-size", "2",
                                         "--sequence-parallel", "--recompute-granularity", "selective",
                                         "--recompute-modules", "mlp", "shared_experts"]),
    "mla,tp2,sp": (2, ["--config", "examples/configs/demo.yaml", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "mla,tp2": (2, ["--config", "examples/configs/demo.yaml", "--tensor-model-parallel-size", "2"]),
    "mla,cp2,ring": (2, ["--config", "examples/configs/demo.yaml", "--context-parallel-size", "2"]),
    "mla,ep2,etp2,tp2,sp": (4, ["--config", "examples/configs/demo.yaml", "--tensor-model-parallel-size", "2",
                                "--sequence-parallel", "--expert-model-parallel-size", "2",
                                "--expert-tensor-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    # the forward in pieces (--overlap-moe-expert-parallel-comm), and recompute inside them
    **{f"mla,pieces{name}": (1, ["--config", "examples/configs/demo.yaml", "--moe-token-dispatcher-type", "alltoall",
                                 "--overlap-moe-expert-parallel-comm", *flags])
       for name, flags in [("", []), (",full-recompute", ["--recompute-granularity", "full"]),
                           (",moe-recompute", ["--moe-layer-recompute"]),
                           (",shared-recompute", ["--recompute-granularity", "selective", "--recompute-modules",
                                                  "shared_experts"])]},
    # GQA with QK-norm, every layer MoE without shared experts
    "gqa,ep2": (2, ["--config", "examples/configs/tiny_qwen3_moe.yaml", "--expert-model-parallel-size", "2",
                    "--moe-token-dispatcher-type", "alltoall"]),
    "gqa,tp2,sp,cp2": (4, ["--config", "examples/configs/tiny_qwen3_moe.yaml", "--tensor-model-parallel-size", "2",
                           "--sequence-parallel", "--context-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predicted_activations_are_what_a_forward_keeps(workers, layout):
    world, flags = LAYOUTS[layout]
    flags = flags + BASE + ["--global-batch-size", str(2 * world)]
    results = [_kept_and_predicted(flags)] if world == 1 else workers(world).run(_kept_and_predicted, flags)
    for rank, (kept, predicted) in enumerate(results):
        # within 5%: what is not itemised is per-tensor bookkeeping (int64 indices, scalars)
        assert abs(predicted - kept) <= 0.05 * kept, (rank, kept, predicted, predicted / kept)


def test_micro_batches_in_flight_follow_the_schedules():
    def in_flight(name, pp, vpp, num_micro):
        chunks = 2 if name == "dualpipev" else vpp
        return [_simulate(build_schedule(name, pp, rank, num_micro, vpp)[1], [1] * chunks)[1] for rank in range(pp)]

    # 1F1B: stage i holds pp - i micro-batches (its warm-up forwards, then one more)
    assert in_flight("1f1b", 4, 1, 8) == [4, 3, 2, 1]
    assert in_flight("1f1b", 4, 1, 2) == [2, 2, 2, 1]  # fewer micro-batches than stages
    # interleaved: Megatron's warm-up of (pp - i - 1) * 2 + (vpp - 1) * pp chunk-forwards, plus one
    assert in_flight("1f1b", 4, 2, 8) == [(4 - i - 1) * 2 + 4 + 1 for i in range(4)]
    assert in_flight("1f1b", 2, 3, 6) == [(2 - i - 1) * 2 + 2 * 2 + 1 for i in range(2)]
    # DualPipeV: DeepSeek gives PP + 1 micro-batches of a device's layers (two chunks) per rank
    # as its activation memory; the planner's bound holds weight-gradient inputs until W
    for pp in (4, 8):
        assert all(2 * pp <= n <= 2 * (pp + 1) for n in in_flight("dualpipev", pp, 1, 4 * pp))


def test_recompute_shrinks_the_prediction_as_the_code_keeps_less():
    config_flags = ["--config", "examples/configs/deepseek_v2_lite.yaml", "--num-layers", "4", "--moe-layer-freq",
                    "[0]*1+[1]*3", "--bf16", "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size",
                    "1"]

    def kept(extra):
        config = parse_config(config_flags + extra)
        plan = stage_plan(config, ParallelState.without_process_groups(validate(config, 1), 0), 1)
        return sum(plan.chunk_bytes) - plan.head

    # hand-counted per token for the V2-Lite proxy (D 2048, 16 heads of 128 + 64 rope, kv_lora 512,
    # dense ffn 10944, 64 experts top-6 of 1408, 2 shared): full recompute keeps each layer's
    # bf16 input, 2 x 2048 bytes, and two CUDA RNG states of 16 bytes; MoE recompute keeps the MoE layers' normalised input (float32
    # copy, bf16 output and rstd: 6 x 2048 + 4) instead of their 160 268 bytes
    tokens = 4096
    assert kept(["--recompute-granularity", "full"]) == 4 * (2 * 2048 * tokens + 2 * 16)
    assert kept([]) - kept(["--moe-layer-recompute"]) == 3 * ((160_268 - (6 * 2048 + 4)) * tokens - 2 * 16)
