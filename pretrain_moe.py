#!/usr/bin/env python
"""Pretrain a Mixture-of-Experts language model.

    python pretrain_moe.py                                   # tiny demo model, CPU, mock data
    torchrun --nproc-per-node 8 pretrain_moe.py --config examples/configs/deepseek_v2_lite.yaml

Flags follow Megatron-LM's names; `--help` lists them all, grouped by section.
"""

from __future__ import annotations

import sys

from megamoe.cli import exit_on_config_error, parse_config
from megamoe.config_validation import validate
from megamoe.parallel.launch import init_distributed, process_info_from_env

PROG = "pretrain_moe.py"


def main(argv: list[str] | None = None) -> int:
    info = process_info_from_env()
    with exit_on_config_error(PROG):
        config = parse_config(argv, prog=PROG)
        validate(config, info.world_size)
    state, _device = init_distributed(config.parallel, info)
    if info.rank == 0:
        print(state.layout.describe(), flush=True)
        print(f"{PROG}: error: the model and training loop are not supported yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
