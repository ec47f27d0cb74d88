#!/usr/bin/env python
"""Pretrain a Mixture-of-Experts language model.

    python pretrain_moe.py                                   # tiny dense GPT, CPU, mock data
    python pretrain_moe.py --config examples/configs/demo.yaml   # the tiny DeepSeek-V3-style demo model
    torchrun --nproc-per-node 4 pretrain_moe.py --tensor-model-parallel-size 2 --sequence-parallel
    torchrun --nproc-per-node 8 pretrain_moe.py --config examples/configs/deepseek_v2_lite.yaml

Flags follow Megatron-LM's names; `--help` lists them all, grouped by section.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megamoe.cli import exit_on_config_error, parse_config
from megamoe.config_validation import notices, validate
from megamoe.parallel.launch import configure_logging, init_distributed, process_info_from_env, set_logging_level
from megamoe.training.stopping import NonFiniteError
from megamoe.training.train import train

PROG = "pretrain_moe.py"


def main(argv: list[str] | None = None) -> int:
    info = process_info_from_env()
    configure_logging(info.rank)
    with exit_on_config_error(PROG):
        config = parse_config(argv, prog=PROG)
        validate(config, info.world_size)
        set_logging_level(config.logging.logging_level, info.rank)
        if info.rank == 0:
            for line in notices(config):
                print(f"> notice: {line}", flush=True)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, info.world_size)))
    state, device = init_distributed(config.parallel, info)
    if info.rank == 0:
        print(state.layout.summary(), flush=True)
        print(state.layout.topology(info.local_world_size), flush=True)
    try:
        with exit_on_config_error(PROG):  # e.g. a --load checkpoint of another model
            train(config, state, device)
    except NonFiniteError as err:  # --check-for-nan-in-loss-and-grad
        if info.rank == 0:
            print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
