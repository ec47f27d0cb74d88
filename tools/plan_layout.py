#!/usr/bin/env python
"""Plan a layout before submitting it: the training state every GPU holds, per pipeline stage,
with the node topology of the groups. Nothing is launched or allocated.

    python tools/plan_layout.py --nnodes 256 --gpus-per-node 8 -- --config examples/configs/deepseek_v3.yaml \\
        --bf16 --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 3 \\
        --decoder-last-pipeline-num-layers 2 --expert-model-parallel-size 64 --use-distributed-optimizer
    MEGAMOE_DRY_RUN=check bash examples/train_deepseek_v3.sh     # the same, for a launch script

Per stage: parameters on one GPU (of them routed experts), bf16/fp32 weights, float32 main
gradients (with bucket padding), float32 masters and Adam's moments (sharded over DP, or
expert-DP for experts, with --use-distributed-optimizer): exactly what training allocates
(tests/training/test_memory_plan.py). Activations, communication volumes and step time are not
predicted yet.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import exit_on_config_error, parse_config  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.training.memory_plan import stage_ranks, state_bytes  # noqa: E402

PROG = "plan_layout.py"
GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="flag stages whose training state alone exceeds this (e.g. 80 for an H100, 141 for an H200)")
    args = p.parse_args(ours)
    with exit_on_config_error(PROG):
        config = parse_config(flags, prog="pretrain_moe.py")
        layout = validate(config, args.nnodes * args.gpus_per_node)
    print(layout.summary())
    print(layout.topology(args.gpus_per_node))
    print(f"{'stage':>5} {'params':>9} {'experts':>9} {'weights':>9} {'grads':>9} {'masters':>9} {'adam':>9} "
          f"{'state':>9}  (GiB per GPU)")
    worst = 0.0
    for stage, rank in enumerate(stage_ranks(layout)):
        s = state_bytes(config, ParallelState.without_process_groups(layout, rank))
        worst = max(worst, s.total / GIB)
        row = [s.params, s.main_grads, s.masters, s.adam_states, s.total]
        print(f"{stage:>5} {s.num_params / 1e9:>8.2f}B {s.num_expert_params / 1e9:>8.2f}B "
              + " ".join(f"{b / GIB:>9.2f}" for b in row))
    if args.gpu_memory_gib is not None and worst > args.gpu_memory_gib:
        print(f"{PROG}: the training state alone ({worst:.1f} GiB) exceeds --gpu-memory-gib {args.gpu_memory_gib:g}, "
              "before any activation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
