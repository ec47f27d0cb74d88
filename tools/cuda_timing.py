"""The benchmarks' timer: the median of CUDA-event timings after a few warm-up calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Milliseconds of one ``fn()`` on the current stream: median of ``iters`` after ``warmup``."""
    times = []
    for _ in range(iters + warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[warmup:])


def host_ms(fn: Callable[[], object], iters: int, warmup: int = 3, busy_ms: float = 50.0) -> float:
    """Milliseconds the host takes to issue one ``fn()`` while the GPU is still busy with
    ``busy_ms`` of earlier work (median of ``iters``): the launch overhead a training step pays
    wherever the GPU is not ahead of the host. A result near ``busy_ms`` or above means ``fn``
    waited for the device (a host synchronisation)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    times = []
    for _ in range(iters + warmup):
        torch.cuda._sleep(int(busy_ms * cycles_per_ms))
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times[warmup:])
