"""Stopping a run on purpose (``--exit-signal-handler``, ``--exit-interval``,
``--exit-duration-in-mins``: save, then exit 0) and on a fault (a non-finite loss or grad norm
with ``--check-for-nan-in-loss-and-grad``: exit non-zero, nothing saved).

Every rank must stop after the same iteration, so the conditions that one rank sees alone (a
signal, its clock) are all-reduced once per iteration; ``--exit-interval`` needs no exchange.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megamoe.config import CheckpointConfig
from megamoe.parallel.state import ParallelState


class NonFiniteError(RuntimeError):
    """The loss or the grad norm went NaN or infinite; the message says where."""


def _first_flagged_rank(bad: bool, state: ParallelState, device: torch.device) -> Optional[int]:
    """The lowest rank that reports ``bad`` (a collective over the world)."""
    flags = torch.zeros(state.layout.world_size, device=device)
    flags[state.rank] = float(bad)
    if dist.is_initialized() and state.layout.world_size > 1:
        dist.all_reduce(flags)
    ranks = flags.nonzero().flatten().tolist()
    return ranks[0] if ranks else None


def check_finite(quantity: str, value: float, iteration: int, locally_bad: bool, state: ParallelState,
                 device: torch.device) -> None:
    """Raise NonFiniteError when ``value`` (the same on every rank) is not finite, naming the
    first rank whose own contribution (``locally_bad``) is not finite either."""
    if math.isfinite(value):
        return
    rank = _first_flagged_rank(locally_bad, state, device)
    where = f"first non-finite on rank {rank}" if rank is not None else "every rank's part is finite"
    raise NonFiniteError(f"iteration {iteration}: the {quantity} is {value} ({where}); stopping without saving "
                         "(--no-check-for-nan-in-loss-and-grad trains on)")


class ExitConditions:
    """Whether to save and exit after an iteration. Installs the SIGTERM handler when asked."""

    def __init__(self, c: CheckpointConfig, state: ParallelState, device: torch.device):
        self.interval, self.state, self.device = c.exit_interval, state, device
        self.deadline = None if c.exit_duration_in_mins is None else time.time() + 60 * c.exit_duration_in_mins
        self.minutes = c.exit_duration_in_mins
        self.signalled = False
        self._exchange = c.exit_signal_handler or self.deadline is not None
        if c.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # finish the iteration, then save and exit
        self.signalled = True

    def reason(self, iteration: int) -> Optional[str]:
        if self._exchange:
            late = self.deadline is not None and time.time() >= self.deadline
            flags = torch.tensor([float(self.signalled), float(late)], device=self.device)
            if dist.is_initialized() and self.state.layout.world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return "SIGTERM (--exit-signal-handler)"
            if flags[1]:
                return f"--exit-duration-in-mins {self.minutes:g} reached"
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        return None
