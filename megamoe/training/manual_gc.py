"""``--manual-gc``: Python's garbage collector at fixed points of the loop instead of whenever
its allocation counters say.

A collection of a large training process takes tens to hundreds of milliseconds. Left
automatic, it lands at a different moment on each rank, and every collective waits for the
slowest rank, so each rank's pause costs all of them. Collecting at the same iterations on
every rank pays the pause once (Megatron-LM's ``--manual-gc``).
"""

from __future__ import annotations

import gc

from megamoe.config import TrainingConfig


class ManualGC:
    """Used as ``with ManualGC(t) as collector:`` around the loop; the collector is restored
    to its earlier state on the way out (tests and tools train in-process)."""

    def __init__(self, t: TrainingConfig):
        self.on, self.interval, self.around_eval = t.manual_gc, t.manual_gc_interval, t.manual_gc_eval
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> "ManualGC":
        if self.on:
            gc.disable()
            gc.collect()
        return self

    def __exit__(self, *exc) -> None:
        if self.on and self._was_enabled:
            gc.enable()

    def after_step(self, step: int) -> None:
        if self.on and self.interval and step % self.interval == 0:
            gc.collect()

    def around_evaluation(self) -> None:
        """Called before and after each evaluation."""
        if self.on and self.around_eval:
            gc.collect()
