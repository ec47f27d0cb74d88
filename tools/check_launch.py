#!/usr/bin/env python
"""Check a launch without launching: the flags pretrain_moe.py would get, validated for the job's
world size, with the layout and its node topology printed.

    python tools/check_launch.py --nnodes 256 --gpus-per-node 8 -- --config examples/configs/deepseek_v3.yaml \\
        --pipeline-model-parallel-size 16 --expert-model-parallel-size 64 ...
    MEGAMOE_DRY_RUN=check bash examples/train_deepseek_v3.sh      # the same, for a launch script

Exit status 0 and the summary when the layout is valid; one line naming the problem and exit
status 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import exit_on_config_error, parse_config  # noqa: E402
from megamoe.config_validation import notices, validate  # noqa: E402

PROG = "check_launch.py"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    args = p.parse_args(ours)
    world = args.nnodes * args.gpus_per_node
    with exit_on_config_error(PROG):
        config = parse_config(flags, prog="pretrain_moe.py")
        layout = validate(config, world)
        for line in notices(config):
            print(f"> notice: {line}")
    print(layout.summary())
    print(layout.topology(args.gpus_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
