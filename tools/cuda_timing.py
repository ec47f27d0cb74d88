"""The benchmarks' timer: the median of CUDA-event timings after a few warm-up calls."""

from __future__ import annotations

import statistics
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
