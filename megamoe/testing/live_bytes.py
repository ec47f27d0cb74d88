"""Live tensor memory on any device, CPU included: the bytes of every storage that an operator
created and that is still alive, and the peak of that sum.

``torch.cuda.max_memory_allocated`` answers the same question on a GPU; the CPU has no such
counter, and the layout planner's activation model needs one to be checked there
(``tools/bench_activations.py`` uses it off CUDA).
Under :class:`LiveBytes` every operator's output storages are recorded (by identity: a view of
a known storage adds nothing) and dropped when torch frees them. What existed before the mode
was entered (parameters, the optimizer's state, inputs) is not counted; what it frees is not
subtracted either, so ``current`` and ``peak`` are the memory the measured code added.

It sees tensors that operators return; memory an operator uses only inside itself (a kernel's
workspace) is not counted, so on CUDA ``max_memory_allocated`` can read higher.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as live: ...``; then ``live.current`` and ``live.peak`` (bytes).
    ``live.reset_peak()`` starts a new peak from the current value."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id of a storage's Python object -> its bytes

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        # torch keeps one Python object per live storage, so its finaliser runs when the memory goes
        self._seen[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view, an in-place update) allocated nothing
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t.untyped_storage()) not in inputs:
                self._track(t)
        return out
