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
- ``interleaved_one_forward_one_backward``: each rank holds ``vpp`` model chunks; virtual
  stage ``chunk * pp + rank`` runs chunk ``chunk`` of rank ``rank``, so activations go round
  the ranks ``vpp`` times (the last rank sends to the first). The bubble shrinks by ``vpp``
  for ``vpp`` times the messages. Micro-batches go through the chunks in groups of ``pp``;
  ``2 (pp - rank - 1) + (vpp - 1) pp`` warm-up forwards, then alternate.

Interleaving follows Megatron-LM's order and its pairing of sends and receives: each schedule
step posts one batch with everything the rank sends and receives, and each neighbour pair
sees its sends and receives in the same order on both sides, which is what NCCL needs to
never deadlock. ``tests/parallel/test_pipeline.py`` replays every rank's calls against
NCCL-like rendezvous semantics to check that, for many ``pp x vpp x micro-batch`` shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megamoe.parallel.state import Group

# forward_step(micro_batch, input_tensor, chunk=0) -> (output_tensor, loss)
ForwardStep = Callable[..., tuple[Optional[torch.Tensor], torch.Tensor]]


@dataclass
class P2P:
    """This stage's neighbours and the activation shape exchanged with them."""

    pp: Group
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    ring: bool = False  # interleaved: the last rank feeds the first (the schedule decides when)
    timed: bool = False  # measure the time blocked in exchanges (synchronises the device: benchmarks only)
    wait_seconds: float = 0.0  # accumulated when ``timed``: the pipeline bubble plus the transfers

    @property
    def first(self) -> bool:
        return self.pp.rank == 0

    @property
    def last(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def _exchange(self, send_next=None, send_prev=None, recv_next=False, recv_prev=False):
        ops, received = [], {}
        has_prev, has_next = self.ring or not self.first, self.ring or not self.last
        prev, next_ = (self.pp.rank - 1) % self.pp.size, (self.pp.rank + 1) % self.pp.size
        # The order matters when prev == next (a ring of two): sends and receives between one
        # pair of ranks match in the order they are posted.
        if recv_prev and has_prev:
            received["prev"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(("recv", received["prev"], prev))
        if send_next is not None and has_next:
            ops.append(("send", send_next.contiguous(), next_))
        if send_prev is not None and has_prev:
            ops.append(("send", send_prev.contiguous(), prev))
        if recv_next and has_next:
            received["next"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(("recv", received["next"], next_))
        if ops:
            self._post(ops)
        return received.get("prev"), received.get("next")

    def _post(self, ops: list[tuple[str, torch.Tensor, int]]) -> None:
        """Post ``(kind, tensor, stage)`` operations as one batch and wait for all of them."""
        batch = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, self.pp.ranks[stage])
                 for kind, tensor, stage in ops]
        if self.timed:
            self._synchronize()
            start = time.perf_counter()
        for request in dist.batch_isend_irecv(batch):
            request.wait()
        if self.timed:
            self._synchronize()
            self.wait_seconds += time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    def exchange(self, y: Optional[torch.Tensor], grad: Optional[torch.Tensor], recv_prev: bool,
                 recv_next: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send an activation forward and a gradient backward, receive either, in one batch."""
        x, grad_out = self._exchange(send_next=y, send_prev=grad, recv_next=recv_next, recv_prev=recv_prev)
        return (None if x is None else x.requires_grad_()), grad_out


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


def forward_only(forward_step: ForwardStep, num_micro: int, p2p: P2P, vpp: int = 1) -> None:
    """Evaluation: every micro-batch through every stage, no backward."""
    if vpp > 1:
        interleaved_one_forward_one_backward(forward_step, num_micro, p2p, vpp, forward_only=True)
        return
    for i in range(num_micro):
        x = p2p.recv_forward()
        y, _ = forward_step(i, None if x is None else x.detach())
        p2p.send_forward(None if y is None else y.detach())


def _virtual_chunk(k: int, pp: int, vpp: int, backward: bool = False) -> int:
    """The chunk of a rank's ``k``-th forward (or backward): groups of ``pp`` micro-batches
    go through chunk 0, then chunk 1, ...; backward visits the chunks in reverse."""
    chunk = (k // pp) % vpp  # Python's floor division: negative k wraps, as the schedule expects
    return vpp - 1 - chunk if backward else chunk


def _virtual_micro(k: int, pp: int, vpp: int) -> int:
    return (k // (pp * vpp)) * pp + k % pp


def interleaved_one_forward_one_backward(forward_step: ForwardStep, num_micro: int, p2p: P2P, vpp: int,
                                         forward_only: bool = False) -> ScheduleStats:
    """Interleaved 1F1B over this rank's ``vpp`` chunks (``p2p.ring`` must be set).

    ``num_micro`` must be a multiple of ``pp``. ``forward_step(micro, x, chunk=c)``; the first
    virtual stage (rank 0, chunk 0) gets ``x=None`` and the last (rank pp-1, chunk vpp-1)
    returns no output. At most ``2 (pp - rank - 1) + (vpp - 1) pp + 1`` chunk-micro-batches'
    activations are alive on a rank.
    """
    pp, rank = p2p.pp.size, p2p.pp.rank
    if num_micro % pp:
        raise ValueError(f"interleaved pipeline: {num_micro} micro-batches is not a multiple of the "
                         f"pipeline size {pp}")
    total = num_micro * vpp
    if forward_only or num_micro == pp:  # Megatron's rule: with pp micro-batches, all forwards first
        warmup = total
    else:
        warmup = min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    remaining = total - warmup

    def first_virtual(chunk: int) -> bool:
        return rank == 0 and chunk == 0

    def last_virtual(chunk: int) -> bool:
        return rank == pp - 1 and chunk == vpp - 1

    inputs: list[list] = [[] for _ in range(vpp)]  # received activations, per chunk, in order
    grads: list[list] = [[] for _ in range(vpp)]  # received output gradients, per chunk, in order
    saved: list[list] = [[] for _ in range(vpp)]
    peak = 0

    def forward(k: int) -> Optional[torch.Tensor]:
        nonlocal peak
        chunk = _virtual_chunk(k, pp, vpp)
        x = None if first_virtual(chunk) else inputs[chunk].pop(0)
        if forward_only:
            y, _ = forward_step(_virtual_micro(k, pp, vpp), None if x is None else x.detach(), chunk=chunk)
            return None if last_virtual(chunk) or y is None else y.detach()
        y, loss = forward_step(_virtual_micro(k, pp, vpp), x, chunk=chunk)
        saved[chunk].append((x, y, loss))
        peak = max(peak, sum(len(s) for s in saved))
        return None if last_virtual(chunk) else y

    def backward(k: int) -> Optional[torch.Tensor]:
        chunk = _virtual_chunk(k, pp, vpp, backward=True)
        grad_output = None if last_virtual(chunk) else grads[chunk].pop(0)
        grad_input = _backward(saved[chunk].pop(0), grad_output)
        return None if first_virtual(chunk) else grad_input

    if rank != 0:
        inputs[0].append(p2p.exchange(None, None, recv_prev=True, recv_next=False)[0])
    for k in range(warmup):
        y = forward(k)
        next_chunk = _virtual_chunk(k + 1, pp, vpp)
        recv_prev = k + 1 < total and not first_virtual(next_chunk)
        # The last warm-up step also collects the first output gradient.
        recv_next = k == warmup - 1 and remaining > 0 and rank != pp - 1
        x, grad = p2p.exchange(y, None, recv_prev, recv_next)
        if recv_prev:
            inputs[next_chunk].append(x)
        if recv_next:
            grads[vpp - 1].append(grad)

    for i in range(remaining):
        y = forward(warmup + i)
        grad_input = backward(i)
        # What arrives now was produced by the neighbour at the same step. Across the wrap
        # (rank pp-1 -> rank 0, and back) that neighbour is pp - 1 steps behind in the order.
        if rank == 0:
            sender_chunk = _virtual_chunk(warmup + i - (pp - 1), pp, vpp)
            recv_prev, next_chunk = sender_chunk != vpp - 1, sender_chunk + 1
        else:
            recv_prev, next_chunk = True, _virtual_chunk(warmup + i + 1, pp, vpp)
        if rank == pp - 1:
            sender_chunk = _virtual_chunk(i - (pp - 1), pp, vpp, backward=True)
            recv_next, next_grad_chunk = sender_chunk != 0, sender_chunk - 1
        else:
            recv_next, next_grad_chunk = True, _virtual_chunk(i + 1, pp, vpp, backward=True)
        recv_prev = recv_prev and i < remaining - 1
        x, grad = p2p.exchange(y, grad_input, recv_prev, recv_next)
        if recv_prev:
            inputs[next_chunk].append(x)
        if recv_next:
            grads[next_grad_chunk].append(grad)

    if forward_only:
        return ScheduleStats(peak)
    if remaining == 0 and rank != pp - 1:
        grads[vpp - 1].append(p2p.exchange(None, None, recv_prev=False, recv_next=True)[1])
    for k in range(remaining, total):
        grad_input = backward(k)
        next_chunk = _virtual_chunk(k + 1, pp, vpp, backward=True)
        recv_next = k + 1 < total and not last_virtual(next_chunk)
        _, grad = p2p.exchange(None, grad_input, False, recv_next)
        if recv_next:
            grads[next_chunk].append(grad)
    return ScheduleStats(peak)


def virtual_stage_layer_ranges(num_layers: int, pp: int, vpp: int = 1, first: Optional[int] = None,
                               last: Optional[int] = None) -> list[list[tuple[int, int]]]:
    """[start, end) of the layers of each rank's chunks: ``ranges[rank][chunk]``.

    Virtual stage ``chunk * pp + rank`` holds the ``chunk``-th slice of its rank's layers, as in
    Megatron-LM: each rank's count (``first`` / ``last`` for the end ranks) splits evenly over its
    ``vpp`` chunks, and the virtual stages take consecutive layers in virtual-stage order.
    """
    per_rank = [end - start for start, end in stage_layer_ranges(num_layers, pp, first, last)]
    if any(count % vpp for count in per_rank):
        raise ValueError(f"pipeline stages of {per_rank} layers cannot be split into {vpp} chunks each")
    sizes = [per_rank[v % pp] // vpp for v in range(pp * vpp)]  # by virtual stage
    starts = [sum(sizes[:v]) for v in range(pp * vpp)]
    return [[(starts[c * pp + r], starts[c * pp + r] + sizes[c * pp + r]) for c in range(vpp)] for r in range(pp)]


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
