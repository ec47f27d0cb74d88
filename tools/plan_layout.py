#!/usr/bin/env python
"""Plan a layout before submitting it: per GPU, the training state, the activations and the
peak memory of every pipeline stage, the bytes each parallel group moves per step, and an
estimated step time; or search the layouts that fit a GPU count and memory. Nothing is
launched or allocated.

    python tools/plan_layout.py --nnodes 256 --gpus-per-node 8 -- --config examples/configs/deepseek_v3.yaml \\
        --bf16 --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 3 \\
        --decoder-last-pipeline-num-layers 2 --expert-model-parallel-size 64 --use-distributed-optimizer
    MEGAMOE_DRY_RUN=check bash examples/train_deepseek_v3.sh     # the same, for a launch script
    python tools/plan_layout.py --nnodes 8 --gpus-per-node 8 --gpu-memory-gib 80 --search -- \\
        --config examples/configs/mixtral_8x7b.yaml --bf16 --seq-length 4096 --micro-batch-size 1 --global-batch-size 512

Memory per stage (GiB per GPU): bf16/fp32 weights, float32 main gradients (with bucket
padding), float32 masters and Adam's moments (sharded over DP, or expert-DP for experts, with
--use-distributed-optimizer): exactly what training allocates (tests/training/test_memory_plan.py);
the activations one micro-batch keeps, how many the schedule holds at once, and the peak above
the state (megamoe/training/activation_plan.py: within a few percent of measurements,
docs/benchmarks.md). Traffic and step time: megamoe/training/comm_plan.py and step_time.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import exit_on_config_error, parse_config, split_at_double_dash  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.training.layout_plan import num_micro_batches, plan_stages, search  # noqa: E402
from megamoe.training.step_time import RATES, seconds  # noqa: E402

PROG = "plan_layout.py"
GIB = 2**30


def print_stages(plans, gpu_memory_gib) -> None:
    print(f"{'stage':>5} {'params':>9} {'experts':>9} {'weights':>8} {'grads':>8} {'masters':>8} {'adam':>8} "
          f"{'state':>8} {'act/mb':>8} {'in flight':>9} {'act peak':>8} {'peak':>8}  (GiB per GPU)")
    for p in plans:
        s, a = p.state, p.activations
        row = [s.params, s.main_grads, s.masters, s.adam_states, s.total, sum(a.chunk_bytes), ]
        flag = "  > --gpu-memory-gib" if gpu_memory_gib is not None and p.peak / GIB > gpu_memory_gib else ""
        print(f"{p.stage:>5} {s.num_params / 1e9:>8.2f}B {s.num_expert_params / 1e9:>8.2f}B "
              + " ".join(f"{b / GIB:>8.2f}" for b in row)
              + f" {a.in_flight:>9} {a.peak / GIB:>8.2f} {p.peak / GIB:>8.2f}{flag}")


def print_traffic(plan, gpus_per_node: int) -> None:
    print(f"traffic per step, stage {plan.stage} (the slowest):")
    print(f"  {'group':<8} {'size':>5} {'spans':>9} {'GB':>9} {'seconds':>8}  what")
    for t in plan.traffic:
        nodes = t.nodes(gpus_per_node)
        spans = "1 node" if nodes == 1 else f"{nodes} nodes"
        print(f"  {t.kind:<8} {t.group.size:>5} {spans:>9} {t.bytes / 1e9:>9.2f} {seconds(t, gpus_per_node):>8.3f}  "
              f"{t.what}")


def print_step(plan, config, world_size: int) -> None:
    e = plan.step
    tokens = config.training.global_batch_size * config.model.seq_length
    comm = ", ".join(f"{k} {v:.3f}" for k, v in e.comm.items()) or "none"
    muon = f" + Muon's Newton-Schulz {e.optimizer:.2f}" if e.optimizer else ""
    print(f"estimated step: {e.total:.2f} s = compute {e.compute:.2f} + pipeline bubble {e.bubble:.2f} + exposed "
          f"communication ({comm}){muon}; {tokens / e.total:,.0f} tokens/s, {tokens / e.total / world_size:,.0f} per GPU")


def print_rates() -> None:
    print("rates (megamoe/training/step_time.py):")
    for name, r in RATES.items():
        print(f"  {name}: {r.value:.3g} {r.unit}; {r.source}")


# name: (--recompute-granularity, --recompute-modules, --moe-layer-recompute)
RECOMPUTE_SETTINGS = {"none": (None, ["core_attn"], False), "selective": ("selective", ["core_attn"], False),
                      "moe": (None, ["core_attn"], True),
                      "moe+mlps": ("selective", ["moe", "mlp", "shared_experts"], False),
                      "full": ("full", ["core_attn"], False)}


def print_recompute_settings(config, layout, gpus_per_node: int, models: dict) -> None:
    """The same layout under each recompute setting: its worst stage's activations and peak."""
    print("recompute settings (the stage with the highest peak; --recompute-granularity, --moe-layer-recompute, "
          "moe+mlps: --recompute-modules moe mlp shared_experts):")
    for name, (granularity, modules, moe) in RECOMPUTE_SETTINGS.items():
        if (moe or "moe" in modules) and not config.moe.num_experts:
            continue
        model = dataclasses.replace(config.model, recompute_granularity=granularity, recompute_modules=modules)
        variant = dataclasses.replace(config, model=model, moe=dataclasses.replace(config.moe, moe_layer_recompute=moe))
        plans = plan_stages(variant, layout, gpus_per_node, models)
        worst = max(plans, key=lambda p: p.peak)
        slowest = max(p.step.total for p in plans)
        print(f"  {name:<9} stage {worst.stage:>2}: {sum(worst.activations.chunk_bytes) / GIB:7.2f} GiB per micro-batch, "
              f"{worst.activations.in_flight} in flight, peak {worst.peak / GIB:7.2f} GiB; step {slowest:.2f} s")


def plan(config, layout, args) -> int:
    print(layout.summary())
    print(layout.topology(args.gpus_per_node))
    print(f"micro-batches per step: {num_micro_batches(config, layout)} of {config.training.micro_batch_size} x "
          f"{config.model.seq_length} tokens; schedule {config.parallel.pipeline_schedule}"
          + (f", {layout.vpp} virtual stages" if layout.vpp else ""))
    models: dict = {}
    plans = plan_stages(config, layout, args.gpus_per_node, models)
    print_stages(plans, args.gpu_memory_gib)
    print_recompute_settings(config, layout, args.gpus_per_node, models)
    slowest = max(plans, key=lambda p: p.step.total)
    print_traffic(slowest, args.gpus_per_node)
    print_step(slowest, config, layout.world_size)
    print_rates()
    worst = max(p.peak for p in plans) / GIB
    if args.gpu_memory_gib is not None and worst > args.gpu_memory_gib:
        print(f"{PROG}: the peak ({worst:.1f} GiB on stage {max(plans, key=lambda p: p.peak).stage}) exceeds "
              f"--gpu-memory-gib {args.gpu_memory_gib:g}", file=sys.stderr)
        return 1
    return 0


def run_search(config, args) -> int:
    world = args.nnodes * args.gpus_per_node
    if args.gpu_memory_gib is None:
        print(f"{PROG}: error: --search needs --gpu-memory-gib", file=sys.stderr)
        return 2

    def progress(tried: int, found: int) -> None:
        print(f"\r{PROG}: {tried} layouts planned, {found} fit", end="", file=sys.stderr, flush=True)

    fits, tried = search(config, world, args.gpus_per_node, args.gpu_memory_gib * GIB, progress)
    print(file=sys.stderr)
    print(f"{len(fits)} of {tried} layouts fit {args.gpu_memory_gib:g} GiB on {args.nnodes} x {args.gpus_per_node} "
          f"GPUs; the {min(args.top, len(fits))} fastest by the estimate:")
    for i, c in enumerate(fits[:args.top], start=1):
        slowest = max(c.plans, key=lambda p: p.step.total)
        e = slowest.step
        muon = f", Muon {e.optimizer:.2f}" if e.optimizer else ""
        print(f"#{i}: {e.total:.2f} s/step (compute {e.compute:.2f}, bubble {e.bubble:.2f}, communication "
              f"{sum(e.comm.values()):.2f}{muon}), peak {c.peak / GIB:.1f} GiB: {' '.join(c.flags)}")
        print(f"    {c.layout.topology(args.gpus_per_node)}")
    if not fits:
        print(f"{PROG}: no layout fits; try more GPUs, a smaller micro-batch, or a shorter sequence", file=sys.stderr)
        return 1
    print_rates()
    return 0


def main(argv: list[str] | None = None) -> int:
    ours, flags = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="flag stages whose peak exceeds this (e.g. 80 for an H100, 141 for an H200); --search keeps "
                        "the layouts under it")
    p.add_argument("--search", action="store_true",
                   help="rank the valid layouts for this GPU count instead of planning the flags' layout")
    p.add_argument("--top", type=int, default=5, help="--search: how many layouts to print")
    args = p.parse_args(ours)
    with exit_on_config_error(PROG):
        config = parse_config(flags, prog="pretrain_moe.py")
        if args.search:
            return run_search(config, args)
        layout = validate(config, args.nnodes * args.gpus_per_node)
    return plan(config, layout, args)


if __name__ == "__main__":
    sys.exit(main())
