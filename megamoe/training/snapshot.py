"""The copy an async save writes: the tensors as they were at one moment, held apart from the
ones training goes on changing.

Training is blocked only for as long as that copy must block it. On a GPU with room for the
copy beside the next steps' peak, the tensors are cloned on the GPU (device-to-device, a few
milliseconds per GB) and the clones go to host memory on a side stream, on the saving thread,
while training continues; the clones are freed once they are on the host. Without that room the
tensors go straight to host memory and training waits for the PCIe copy. Host copies land in
pinned buffers kept from one save to the next (allocating and pinning tens of GB is slower than
the copy itself), so each rank holds its share of the checkpoint in host memory while async
saves are on.
"""

from __future__ import annotations

from typing import Callable

import torch

# left free on the GPU beyond the copy and the peak the training steps reached (fragmentation,
# the allocator's rounding, a step slightly larger than the ones before)
GPU_MARGIN_BYTES = 2 << 30


def gpu_room(device: torch.device) -> int:
    """Bytes a copy may take on ``device`` and still leave the next steps their peak."""
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    step_headroom = torch.cuda.max_memory_allocated(device) - allocated
    return free + cached - step_headroom - GPU_MARGIN_BYTES


class Snapshot:
    """Takes copies of named tensors for a writer on another thread; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.where = ""  # where the last copy was taken, for the log
        self._host: dict[str, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _host_buffers(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = {}
        for key, t in tensors.items():
            buf = self._host.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._stream is not None)
            kept[key] = buf
        self._host = kept  # buffers of tensors no longer saved are let go
        return kept

    def take(self, tensors: dict[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
        """Copy ``tensors`` now; returns the function (to run on the writer's thread) that gives
        their host copies. Once this returns, training may change ``tensors``."""
        if self._stream is None:  # CPU tensors: one copy, here
            host = self._host_buffers(tensors)
            for key, t in tensors.items():
                host[key].copy_(t)
            self.where = "CPU memory"
            return lambda: host
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if nbytes > gpu_room(self.device):
            host = self._host_buffers(tensors)
            for key, t in tensors.items():
                host[key].copy_(t, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            self.where = "pinned CPU memory"
            return lambda: host
        clones = {key: t.clone() for key, t in tensors.items()}
        cloned = torch.cuda.Event()
        cloned.record()
        self.where = "the GPU (then to pinned CPU memory in the background)"

        def to_host() -> dict[str, torch.Tensor]:
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                host = self._host_buffers(clones)
                self._stream.wait_event(cloned)
                for key, t in clones.items():
                    host[key].copy_(t, non_blocking=True)
                self._stream.synchronize()
            clones.clear()  # the side stream is done with them: their memory goes back to training
            return host

        return to_host

    def close(self) -> None:
        self._host = {}
