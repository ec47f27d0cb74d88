#!/usr/bin/env python
"""Print the rank grid of every process group for a world size and parallel degrees.

Nothing is launched: this is the arithmetic ``pretrain_moe.py`` will use, so a job can be
planned (and its groups checked against the node boundaries) before it is submitted.

    python tools/parallel_layout.py --world-size 64 --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 4 --expert-model-parallel-size 8
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import build_parser, config_from_values, exit_on_config_error  # noqa: E402
from megamoe.parallel.state import GROUP_DESCRIPTIONS, ParallelLayout  # noqa: E402

LAYOUT_FIELDS = {
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "parallel_rank_order",
}


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends quietly
    parser = build_parser(
        prog="parallel_layout.py",
        description=__doc__.split("\n\n")[0],
        sections=["parallel"],
        with_config_file=False,
        only=LAYOUT_FIELDS,
    )
    parser.add_argument("--world-size", type=int, required=True, help="Total number of ranks (GPUs).")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="Ranks per node, to flag groups that cross node boundaries (default: 8).")
    parser.add_argument("--rank", type=int, default=None, help="Only show this rank's coordinates and groups.")
    parser.add_argument("--max-groups", type=int, default=None,
                        help="Show at most this many groups of each kind (default: all).")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in LAYOUT_FIELDS}
    with exit_on_config_error(parser.prog):
        layout = ParallelLayout.build(args.world_size, **config_from_values(given).parallel.degrees())
    if args.rank is not None:
        if not 0 <= args.rank < args.world_size:
            parser.error(f"--rank {args.rank}: must be in [0, {args.world_size})")
        print(layout.summary())
        print(f"rank {args.rank}: " + " ".join(f"{k}={v}" for k, v in layout.coords(args.rank).items()))
        for kind, text in GROUP_DESCRIPTIONS.items():
            group = next((g for g in layout.groups(kind) if args.rank in g), None)
            print(f"  {kind:<7}{'-' if group is None else group}  {text}")
        return
    print(layout.describe(max_groups=4))
    node = args.gpus_per_node
    for kind, text in GROUP_DESCRIPTIONS.items():
        groups = layout.groups(kind)
        crossing = sum(len({r // node for r in g}) > 1 for g in groups)
        note = f"; {crossing} of {len(groups)} cross a {node}-GPU node boundary" if crossing else ""
        print(f"\n{kind}: {text} ({len(groups)} groups of {len(groups[0])}{note})")
        shown = groups if args.max_groups is None else groups[: args.max_groups]
        text_groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in shown)
        print(textwrap.fill(text_groups, width=100, initial_indent="  ", subsequent_indent="  ",
                            break_on_hyphens=False))
        if len(shown) < len(groups):
            print(f"  ... {len(groups) - len(shown)} more")


if __name__ == "__main__":
    main()
