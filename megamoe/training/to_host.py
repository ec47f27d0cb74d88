"""Device values on their way to the host without the host waiting for the device.

A ``.item()`` waits for everything queued before it. Copying into pinned host memory instead
(non-blocking) and waiting on an event recorded right after the copy lets the host queue more
work first (the optimizer's step) and then wait only for what the value depends on.
"""

from __future__ import annotations

from typing import Optional

import torch


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """``t`` copied into (pinned) host memory without waiting for the device, and the event to
    wait on before reading the copy (None: a CPU tensor, copied already)."""
    if not t.is_cuda:
        return t.clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


class PendingValue:
    """A scalar copied to the host (:func:`copy_to_host`), or one known already: :meth:`read`
    waits for the copy only, not for device work queued after it."""

    def __init__(self, value: Optional[float] = None, device_value: Optional[torch.Tensor] = None):
        self._value = value
        self._host, self._copied = (None, None) if device_value is None else copy_to_host(device_value)

    def read(self) -> float:
        if self._value is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._value = self._host.item()
        return self._value
