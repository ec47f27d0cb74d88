"""Shared fixtures: long-lived gloo (and, where present, NCCL) worker pools.

Spawning ranks costs a few seconds each on a 2-core machine, so pools are created once per
session per (world size, backend) and reused by every test; a failing test kills its pool and
the next test that needs it starts a fresh one.
"""

from __future__ import annotations

import pytest
import torch

from megamoe.testing.distributed import DistributedWorkers


@pytest.fixture(scope="session")
def workers():
    """``workers(n, backend="gloo")`` -> a DistributedWorkers pool of n ranks."""
    pools: dict[tuple[int, str], DistributedWorkers] = {}

    def get(world_size: int, backend: str = "gloo") -> DistributedWorkers:
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            pytest.skip(f"needs {world_size} GPUs for NCCL")
        key = (world_size, backend)
        if key not in pools:
            pools[key] = DistributedWorkers(world_size, backend=backend, timeout=180.0)
        return pools[key]

    yield get
    for pool in pools.values():
        pool.close()


BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="NCCL tier needs CUDA GPUs")]),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Run a multi-rank test on gloo (CPU) and, where GPUs are present, on NCCL."""
    return request.param
