"""``--num-workers``: the upcoming steps' batches, prepared by background threads.

Preparing a step's batches (reading the samples, assembling them, moving them to the device)
overlaps the steps before it. Worker ``k`` of ``n`` prepares one step at a time, so up to ``n``
steps are in flight ahead of the one training; they are handed out in step order, whichever
finishes first. With 0 workers each step's batches are prepared in the loop, when needed.
Threads, not processes: the work is memory copies in numpy and torch, which release the GIL,
and a thread shares the open datasets instead of reopening them.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class StepPrefetcher:
    """``get(step)`` for steps ``first .. last`` in order; use as a context manager."""

    def __init__(self, make: Callable[[int], Any], first: int, last: int, workers: int):
        self.make, self.last = make, last
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batches") if workers else None
        self.pending: deque[tuple[int, Future]] = deque()
        self.next_step = first
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and len(self.pending) < self.workers and self.next_step <= self.last:
            self.pending.append((self.next_step, self.pool.submit(self.make, self.next_step)))
            self.next_step += 1

    def get(self, step: int) -> Any:
        if self.pool is None:
            return self.make(step)
        ready, future = self.pending.popleft()
        if ready != step:
            raise RuntimeError(f"batches of step {step} asked for, step {ready} is next")
        batches = future.result()
        self._fill()
        return batches

    def __enter__(self) -> "StepPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:  # an early exit leaves steps nobody will train on
            self.pool.shutdown(wait=True, cancel_futures=True)
