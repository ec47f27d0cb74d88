"""Pipeline parallelism: point-to-point exchange between stages and the micro-batch schedules.

A schedule drives a ``forward_step(micro_batch, input_tensor) -> (output_tensor, loss)``
callback: ``input_tensor`` is what the previous stage sent (None on the first stage),
``output_tensor`` what goes to the next stage (None on the last) and ``loss`` a scalar this
stage backpropagates itself (its MoE balancing losses; on the last stage also the language
model loss). Backward runs ``autograd.backward([loss, output], [1, grad from the next stage])``
and sends the input's gradient to the previous stage.

Shapes are known ahead (``[s, micro_batch, hidden]``, ``s / tp`` with sequence parallel), so
only activations and gradients travel. Sends and receives that happen at the same time are
posted together (``batch_isend_irecv``) so neighbouring stages never wait on each other.

- ``all_forward_all_backward``: every forward, then every backward (reference; keeps all
  micro-batches' activations).
- ``one_forward_one_backward`` (1F1B): ``pp - stage - 1`` warm-up forwards, then alternate;
  at most ``pp - stage`` micro-batches' activations are alive on a stage at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megamoe.parallel.state import Group

ForwardStep = Callable[[int, Optional[torch.Tensor]], tuple[Optional[torch.Tensor], torch.Tensor]]


@dataclass
class P2P:
    """This stage's neighbours and the activation shape exchanged with them."""

    pp: Group
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def first(self) -> bool:
        return self.pp.rank == 0

    @property
    def last(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def _exchange(self, send_next=None, send_prev=None, recv_next=False, recv_prev=False):
        ops, received = [], {}
        if recv_prev and not self.first:
            received["prev"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received["prev"], self.pp.ranks[self.pp.rank - 1]))
        if send_next is not None and not self.last:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.pp.ranks[self.pp.rank + 1]))
        if send_prev is not None and not self.first:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.pp.ranks[self.pp.rank - 1]))
        if recv_next and not self.last:
            received["next"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received["next"], self.pp.ranks[self.pp.rank + 1]))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received.get("prev"), received.get("next")

    def recv_forward(self) -> Optional[torch.Tensor]:
        x, _ = self._exchange(recv_prev=True)
        return None if x is None else x.requires_grad_()

    def send_forward(self, y: Optional[torch.Tensor]) -> None:
        self._exchange(send_next=y)

    def recv_backward(self) -> Optional[torch.Tensor]:
        return self._exchange(recv_next=True)[1]

    def send_backward(self, grad: Optional[torch.Tensor]) -> None:
        self._exchange(send_prev=grad)

    def send_forward_recv_backward(self, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return self._exchange(send_next=y, recv_next=True)[1]

    def send_backward_recv_forward(self, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x, _ = self._exchange(send_prev=grad, recv_prev=True)
        return None if x is None else x.requires_grad_()


def _backward(saved, grad_output: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    x, y, loss = saved
    tensors, grads = [], []
    if loss.requires_grad:  # a stage without MoE layers before the last has no loss of its own
        tensors.append(loss)
        grads.append(torch.ones_like(loss))
    if y is not None and grad_output is not None:
        tensors.append(y)
        grads.append(grad_output)
    torch.autograd.backward(tensors, grads)
    return None if x is None else x.grad


@dataclass
class ScheduleStats:
    max_in_flight: int  # most micro-batches whose activations were alive at once on this stage


def all_forward_all_backward(forward_step: ForwardStep, num_micro: int, p2p: P2P) -> ScheduleStats:
    saved = []
    for i in range(num_micro):
        x = p2p.recv_forward()
        y, loss = forward_step(i, x)
        p2p.send_forward(y)
        saved.append((x, y, loss))
    peak = len(saved)
    while saved:
        grad = p2p.recv_backward()
        p2p.send_backward(_backward(saved.pop(0), grad))
    return ScheduleStats(peak)


def one_forward_one_backward(forward_step: ForwardStep, num_micro: int, p2p: P2P) -> ScheduleStats:
    warmup = min(p2p.pp.size - p2p.pp.rank - 1, num_micro)
    steady = num_micro - warmup
    saved, peak = [], 0
    for i in range(warmup):
        x = p2p.recv_forward()
        y, loss = forward_step(i, x)
        p2p.send_forward(y)
        saved.append((x, y, loss))
        peak = max(peak, len(saved))
    x = p2p.recv_forward() if steady else None
    for i in range(steady):
        y, loss = forward_step(warmup + i, x)
        saved.append((x, y, loss))
        peak = max(peak, len(saved))
        grad = p2p.send_forward_recv_backward(y)
        grad_in = _backward(saved.pop(0), grad)
        if i == steady - 1:
            p2p.send_backward(grad_in)
        else:
            x = p2p.send_backward_recv_forward(grad_in)
    for _ in range(warmup):
        grad = p2p.recv_backward()
        p2p.send_backward(_backward(saved.pop(0), grad))
    return ScheduleStats(peak)


def forward_only(forward_step: ForwardStep, num_micro: int, p2p: P2P) -> None:
    """Evaluation: every micro-batch through every stage, no backward."""
    for i in range(num_micro):
        x = p2p.recv_forward()
        y, _ = forward_step(i, None if x is None else x.detach())
        p2p.send_forward(None if y is None else y.detach())


def stage_layer_ranges(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> list[tuple[int, int]]:
    """[start, end) of the layers on each pipeline stage.

    ``first`` / ``last`` fix the first and last stages' layer counts (an embedding- or
    head-heavy end gets fewer layers); the remaining layers split evenly over the other stages.
    """
    if pp == 1:
        return [(0, num_layers)]
    counts: list[Optional[int]] = [None] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - sum(c for c in counts if c is not None)
    if rest < 0 or (free and rest % len(free)) or (not free and rest):
        raise ValueError(f"{num_layers} layers cannot be split over {pp} stages with first={first}, last={last}")
    for i in free:
        counts[i] = rest // len(free)
    starts = [sum(counts[:i]) for i in range(pp)]
    return [(s, s + c) for s, c in zip(starts, counts)]
