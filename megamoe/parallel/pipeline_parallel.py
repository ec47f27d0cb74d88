"""Pipeline parallelism: point-to-point transfers between stages, the one interpreter that runs
every schedule, and which layers each stage holds.

The schedules themselves are data (``megamoe/parallel/schedules.py``: 1F1B, interleaved 1F1B,
DualPipeV): per rank, a list of forward, backward, weight-gradient and transfer actions.
:func:`run_schedule` runs such a list with a ``forward_step(micro_batch, input_tensor,
chunk=c) -> (output_tensor, loss)`` callback: ``input_tensor`` is what the previous stage sent
(None on the first stage), ``output_tensor`` what goes to the next (None on the last), and
``loss`` a scalar the stage backpropagates itself (its MoE balancing losses; on the last stage
also the language-model loss). A backward runs ``autograd.backward([loss, output], [1, grad
from the next stage])`` and the input's gradient goes to the previous stage; with a
:class:`~megamoe.parallel.weight_grad.WeightGradStore` it may leave the weight gradients for a
later ``W`` action.

Shapes are known ahead (``[s, micro_batch, hidden]``, ``s / tp`` with sequence parallel), so
only activations and gradients travel. The transfers a schedule queues between two ``FLUSH``
actions are posted together (``batch_isend_irecv``), in the order listed, which is what NCCL's
matching needs: ``tests/parallel/test_pipeline.py`` replays every schedule on threads under
NCCL-like rendezvous rules for many shapes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megamoe.parallel.pieces import PieceRun, interleave
from megamoe.parallel.schedules import (Action, Placement, all_forward_all_backward, dualpipev, forward_only,
                                        interleaved_1f1b, one_f_one_b, paired_1f1b)
from megamoe.parallel.state import Group
from megamoe.parallel.weight_grad import WeightGradStore

# forward_step(micro_batch, input_tensor, chunk=0) -> (output_tensor, loss)
ForwardStep = Callable[..., tuple[Optional[torch.Tensor], torch.Tensor]]
# piece_step(micro_batch, input_tensor, chunk) -> a PieceRun not run yet (parallel/pieces.py)
PieceStep = Callable[[int, Optional[torch.Tensor], int], PieceRun]


@dataclass
class P2P:
    """The pipeline group's transport and the activation shape exchanged between stages."""

    pp: Group
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    timed: bool = False  # measure the time blocked in exchanges (synchronises the device: benchmarks only)
    wait_seconds: float = 0.0  # accumulated when ``timed``: the pipeline bubble plus the transfers

    def buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def post(self, ops: list[tuple[str, torch.Tensor, int]]) -> None:
        """Post ``(kind, tensor, pipeline rank)`` operations as one batch and wait for all of them."""
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


def _backward(x: Optional[torch.Tensor], y: Optional[torch.Tensor], loss: torch.Tensor,
              grad_output: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
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
    max_in_flight: int  # most micro-batches whose activations were alive at once on this rank


class _Run:
    """One rank's run of a schedule: the tensors between its actions, keyed by (micro, chunk).

    With ``piece_step`` (``--overlap-moe-expert-parallel-comm``) every forward is a
    :class:`~megamoe.parallel.pieces.PieceRun`, and a forward listed right before a backward runs
    interleaved with it, piece by piece (DualPipe's overlapped pairs)."""

    def __init__(self, placement: Placement, forward_step: ForwardStep, p2p: P2P, train: bool,
                 wgrad_store: Optional[WeightGradStore], piece_step: Optional[PieceStep]):
        self.placement, self.forward_step, self.p2p = placement, forward_step, p2p
        self.train, self.wgrad_store, self.rank = train, wgrad_store, p2p.pp.rank
        self.piece_step = piece_step if train else None
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # F's input (none on the first stage)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # F's output waiting for its SEND_F
        self.saved: dict[tuple[int, int], tuple] = {}  # (input, output, loss) or (input, PieceRun) until B
        self.grads_out: dict[tuple[int, int], torch.Tensor] = {}  # B's output gradient
        self.grads_in: dict[tuple[int, int], torch.Tensor] = {}  # B's input gradient waiting for its SEND_B
        self.queued: list[tuple[str, torch.Tensor, int]] = []
        self.received: list[torch.Tensor] = []
        self.peak = 0

    def forward(self, a: Action, paired: Optional[Action] = None) -> None:
        """F; with ``paired`` (a B), the two interleaved piece by piece."""
        key = (a.micro, a.chunk)
        x = self.inputs.pop(key, None)
        if self.piece_step is not None:
            run = self.piece_step(a.micro, x, a.chunk)
            if paired is None:
                run.forward()
            else:
                interleave(run.forward_steps(), self._backward_steps(paired))
            y = None if run.output is None else run.result(run.output)
            self.saved[key] = (x, run)
        elif self.train:
            y, loss = self.forward_step(a.micro, x, chunk=a.chunk)
            self.saved[key] = (x, y, loss)
        else:
            with torch.no_grad():
                y, _ = self.forward_step(a.micro, x, chunk=a.chunk)
        self.peak = max(self.peak, len(self.saved) + (paired is not None))  # the paired B's, until it ends
        following = self.placement.neighbour(self.rank, a.chunk, 1)
        if following is not None and following[0] == self.rank:  # the V's turn: handed over here
            self.inputs[(a.micro, following[1])] = y.detach().requires_grad_(self.train)
        elif following is not None:
            self.outputs[key] = y if self.train else y.detach()

    def backward(self, a: Action) -> None:
        for _ in self._backward_steps(a):
            pass

    def _backward_steps(self, a: Action):
        key = (a.micro, a.chunk)
        saved = self.saved.pop(key)
        if a.defer_w and self.wgrad_store is None:
            raise ValueError("the schedule defers weight gradients but no WeightGradStore was given")
        store, grad_output = self.wgrad_store, self.grads_out.pop(key, None)
        with store.deferring(a.defer_w) if store is not None else nullcontext():
            if len(saved) == 2:  # a piece run
                yield from saved[1].backward_steps(grad_output)
                grad_input = None if saved[0] is None else saved[1].grad("x")
            else:
                grad_input = _backward(*saved, grad_output)
        preceding = self.placement.neighbour(self.rank, a.chunk, -1)
        if preceding is not None and preceding[0] == self.rank:
            self.grads_out[(a.micro, preceding[1])] = grad_input
        elif preceding is not None:
            self.grads_in[key] = grad_input

    def transfer(self, a: Action) -> None:
        key, peer = (a.micro, a.chunk), self.placement.peer(self.rank, a.kind, a.chunk)
        if a.kind in ("RECV_F", "RECV_B"):
            buffer = self.p2p.buffer()
            (self.inputs if a.kind == "RECV_F" else self.grads_out)[key] = buffer
            self.queued.append(("recv", buffer, peer))
            if a.kind == "RECV_F":
                self.received.append(buffer)
        else:
            tensor = (self.outputs if a.kind == "SEND_F" else self.grads_in).pop(key)
            self.queued.append(("send", tensor.contiguous(), peer))

    def flush(self) -> None:
        self.p2p.post(self.queued)
        for x in self.received:  # activations received for a forward: its backward needs their gradient
            x.requires_grad_(self.train)
        self.queued, self.received = [], []


def run_schedule(actions: list[Action], placement: Placement, forward_step: ForwardStep, p2p: P2P,
                 train: bool = True, wgrad_store: Optional[WeightGradStore] = None,
                 piece_step: Optional[PieceStep] = None) -> ScheduleStats:
    """Run this rank's ``actions`` (see ``schedules.py``). ``train=False``: forwards only, without
    autograd. ``wgrad_store``: where backward actions with ``defer_w`` leave weight gradients.
    ``piece_step``: forwards as piece runs, and each F listed right before a B (no transfer
    between them) interleaved with it."""
    run = _Run(placement, forward_step, p2p, train, wgrad_store, piece_step)
    pending_pair = None
    for i, a in enumerate(actions):
        if a is pending_pair:  # the B already run with the F before it
            pending_pair = None
            continue
        if a.kind == "F":
            following = actions[i + 1] if i + 1 < len(actions) else None
            pairs = (run.piece_step is not None and following is not None and following.kind == "B"
                     and (following.micro, following.chunk) != (a.micro, a.chunk))
            pending_pair = following if pairs else None
            run.forward(a, pending_pair)
        elif a.kind == "B":
            run.backward(a)
        elif a.kind == "W":
            wgrad_store.run_next()
        elif a.kind == "FLUSH":
            run.flush()
        else:
            run.transfer(a)
    assert not (run.queued or run.saved or run.grads_in or run.outputs), "the schedule left work undone"
    return ScheduleStats(run.peak)


def build_schedule(name: str, pp: int, rank: int, num_micro: int, vpp: int = 1,
                   train: bool = True, paired: bool = False) -> tuple[Placement, list[Action]]:
    """(placement, this rank's actions) of ``--pipeline-schedule name`` ('1f1b', interleaved with
    ``vpp`` > 1, or 'dualpipev'); ``train=False`` for evaluation. ``paired``: 1F1B's steady
    state as forward-backward pairs of different micro-batches (--overlap-moe-expert-parallel-comm;
    DualPipeV pairs its own)."""
    if paired and train and name != "dualpipev":
        return Placement(pp, vpp), paired_1f1b(pp, rank, num_micro, vpp)
    if name == "dualpipev":
        placement, actions = Placement(pp, 2, "v"), dualpipev(pp, rank, num_micro)
        return placement, actions if train else forward_only(actions)
    if vpp > 1:
        return Placement(pp, vpp), interleaved_1f1b(pp, rank, num_micro, vpp, forward_only=not train)
    if train:
        return Placement(pp), one_f_one_b(pp, rank, num_micro)
    return Placement(pp), forward_only(all_forward_all_backward(pp, rank, num_micro))  # each micro-batch through


def v_stage_layer_ranges(num_layers: int, pp: int, first: Optional[int] = None,
                         last: Optional[int] = None) -> list[list[tuple[int, int]]]:
    """The V placement's (DualPipeV) ``ranges[rank][chunk]``: ``2 pp`` virtual stages of
    consecutive layers (``first`` / ``last``: the first and last virtual stages' counts); rank r
    holds stage r and stage ``2 pp - 1 - r``."""
    stages = stage_layer_ranges(num_layers, 2 * pp, first, last)
    return [[stages[r], stages[2 * pp - 1 - r]] for r in range(pp)]


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
    return ranges_by_rank([per_rank[v % pp] // vpp for v in range(pp * vpp)], pp)


def ranges_by_rank(sizes: list[int], pp: int) -> list[list[tuple[int, int]]]:
    """``ranges[rank][chunk]`` of virtual stages of ``sizes`` decoder layers each, in virtual-stage
    order, stage ``chunk * pp + rank`` on ``rank`` (Megatron-LM's interleaved placement)."""
    starts = [sum(sizes[:v]) for v in range(len(sizes))]
    vpp = len(sizes) // pp
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
