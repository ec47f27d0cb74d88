"""Named RNG streams, so dropout is identical where it must be and independent where it must not.

- The *default* stream of the device is seeded the same on every TP rank of a pipeline stage.
  Dropout on replicated activations (the residual stream without sequence parallel) draws from
  it and so drops the same elements on every TP rank, keeping the replicas identical.
- The ``"tensor-parallel"`` stream is seeded differently on every TP rank. Dropout on sharded
  activations (attention probabilities of this rank's heads, sequence-parallel activations)
  forks into it, so shards do not reuse one mask.
- The ``"expert-parallel"`` stream is seeded per (EP, ETP) rank, for the experts.

``with tracker.fork("tensor-parallel"): ...`` swaps the device's default generator state for the
named one and back, so any torch op inside draws from that stream. The states travel in
checkpoints (:meth:`RNGStatesTracker.state_dict`) and activation recomputation replays them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.checkpoint import checkpoint

from megamoe.parallel.state import ParallelState

TENSOR_PARALLEL_STREAM = "tensor-parallel"
EXPERT_PARALLEL_STREAM = "expert-parallel"

# Offsets keep the streams apart from each other and from the default seed.
_TP_OFFSET = 2718
_EP_OFFSET = 1024


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Holds named generator states for one device and forks into them."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Create a stream from a seed without disturbing the default stream."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = _get_state(self.device)
        torch.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self._states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Draw from the named stream inside the block; it advances, the default stream does not."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added")
        saved = _get_state(self.device)
        _set_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(self.device, saved)

    @contextlib.contextmanager
    def replaying(self, states: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the block from earlier stream states (activation recomputation), then put the
        current ones back, so the replay neither sees nor disturbs later draws."""
        current = self._states
        self._states = {name: state.clone() for name, state in states.items()}
        try:
            yield
        finally:
            self._states = current

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}


def recompute_with_rng(fn: Callable[..., Any], *args: Any, rng_tracker: Optional[RNGStatesTracker] = None) -> Any:
    """``fn(*args)`` under activation checkpointing, recomputed in backward with the same random
    numbers: torch's checkpoint replays the default stream; this also replays the tracker's
    named streams (dropout on TP shards), which have advanced by the time backward runs."""
    if rng_tracker is None:
        return checkpoint(fn, *args, use_reentrant=False)

    def contexts():  # called once, when the forward pass enters the checkpointed region
        return contextlib.nullcontext(), rng_tracker.replaying(rng_tracker.state_dict())

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def model_parallel_seed(seed: int, state: ParallelState, device: torch.device | str = "cpu") -> RNGStatesTracker:
    """Seed the default stream and create the tensor- and expert-parallel streams.

    The default seed differs between pipeline stages (different layers) but not between TP,
    CP or DP ranks; data order is not drawn from it.
    """
    device = torch.device(device)
    default_seed = seed + 100 * state.pp.rank
    torch.manual_seed(default_seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(default_seed)
    tracker = RNGStatesTracker(device)
    tracker.add(TENSOR_PARALLEL_STREAM, default_seed + _TP_OFFSET + state.tp.rank)
    tracker.add(EXPERT_PARALLEL_STREAM, default_seed + _EP_OFFSET + 100 * state.ep.rank + state.etp.rank)
    return tracker
