"""Join the job: read rank and world size from torchrun or SLURM, initialise torch.distributed,
and build the :class:`~megamoe.parallel.state.ParallelState`."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.config import ParallelConfig
from megamoe.parallel.state import ParallelState


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node (GPUs per node)


def process_info_from_env() -> ProcessInfo:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return ProcessInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                           int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        return ProcessInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), max(1, world // nodes))
    return ProcessInfo(0, 1, 0, 1)


def configure_logging(rank: int) -> None:
    """Warnings once per job, not once per rank: rank 0 shows warnings (megamoe's log records
    and Python ``warnings``, which are routed into logging); the other ranks show errors only.
    Every rank hits the same warning in the same place, so rank 0's copy stands for all."""
    logging.captureWarnings(True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("> %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def set_logging_level(level: Optional[int], rank: int) -> None:
    """``--logging-level``: rank 0 logs from ``level`` up; the other ranks from the higher of
    ``level`` and errors, so a warning is still shown once per job."""
    if level is not None:
        logging.getLogger().setLevel(level if rank == 0 else max(level, logging.ERROR))


def init_distributed(config: ParallelConfig, info: ProcessInfo) -> tuple[ParallelState, torch.device]:
    """Initialise the default process group (if more than one rank) and every parallel group.

    NCCL on GPUs; gloo when no GPU is present (or ``--distributed-backend gloo``).
    MASTER_ADDR / MASTER_PORT come from torchrun, or from the SLURM script.
    """
    use_cuda = torch.cuda.is_available() and config.distributed_backend == "nccl"
    device = torch.device("cuda", info.local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=config.distributed_timeout_minutes),
            device_id=device if use_cuda else None,
        )
    state = ParallelState.build(**config.degrees(), world_size=info.world_size, rank=info.rank)
    return state, device
