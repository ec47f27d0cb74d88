"""Pipeline schedules as data: for each pipeline rank, the list of actions it runs.

A generator here (1F1B, interleaved 1F1B, their paired form, DualPipeV, all-forward-all-backward)
returns one rank's :class:`Action` list; :func:`megamoe.parallel.pipeline_parallel.run_schedule`
is the one interpreter that runs any of them. Lists are plain data, so the tests check them without
processes: every rank's list on threads whose transport has NCCL's matching rules (a deadlock
becomes a timeout there), and :func:`check_schedule` checks one list's bookkeeping.

Actions (``m`` micro-batch, ``c`` this rank's model chunk):

- ``F m c``: forward of chunk ``c`` on micro-batch ``m``.
- ``B m c``: its backward: the input's gradient and the weight gradients; with ``defer_w`` the
  weight gradients wait in a :class:`~megamoe.parallel.weight_grad.WeightGradStore` group.
- ``W``: the weight gradients of the oldest deferred ``B`` (zero-bubble filling).
- ``RECV_F m c`` / ``RECV_B m c``: queue the receive of ``F m c``'s input (from the previous
  virtual stage) / of ``B m c``'s output gradient (from the next one).
- ``SEND_F m c`` / ``SEND_B m c``: queue the send of ``F m c``'s output / ``B m c``'s input
  gradient.
- ``FLUSH``: post the queued transfers as one batch and wait for it.

A :class:`Placement` says which virtual stage each (rank, chunk) runs; neighbours on the same
rank (DualPipeV's turn on the last rank) hand tensors over locally, so no transfer is listed.
Transfers between two ranks match in the order they are posted (NCCL's rule), so the order of
the transfer actions is part of the schedule.

Placements and schedules:

- ``loop`` (1F1B, interleaved): virtual stage ``c * pp + rank``; with ``vpp`` chunks the
  activations go round the ranks ``vpp`` times. 1F1B's bubble is ``(pp - 1)(F + B)``.
- ``v`` (DualPipeV, deepseek-ai/DualPipe): two chunks per rank, stage ``rank`` going down and
  stage ``2 pp - 1 - rank`` coming back, so rank 0 holds both the embedding and the loss.
  Micro-batches enter from both ends of the V in a steady state of ``F0 B1 F1 B0``, and
  backward passes split input and weight gradients so ``W`` fills the gaps: the bubble is
  ``(pp / 2 - 1)(F&B + B - 3 W)``. It needs at least ``2 pp`` micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Kind = Literal["F", "B", "W", "RECV_F", "RECV_B", "SEND_F", "SEND_B", "FLUSH"]
TRANSFERS = ("RECV_F", "RECV_B", "SEND_F", "SEND_B")


@dataclass(frozen=True)
class Action:
    kind: Kind
    micro: int = -1
    chunk: int = 0
    defer_w: bool = False  # B only: leave the weight gradients to a later W

    def __str__(self) -> str:
        if self.kind in ("W", "FLUSH"):
            return self.kind
        return f"{self.kind} {self.micro}.{self.chunk}" + ("*" if self.defer_w else "")


@dataclass(frozen=True)
class Placement:
    """Which virtual stage each (rank, chunk) runs: ``loop`` or ``v`` (see the module docstring)."""

    pp: int
    chunks: int = 1
    shape: Literal["loop", "v"] = "loop"

    def __post_init__(self):
        if self.shape == "v" and self.chunks != 2:
            raise ValueError(f"a V placement has 2 chunks per rank, not {self.chunks}")

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        if self.shape == "v":
            return rank if chunk == 0 else 2 * self.pp - 1 - rank
        return chunk * self.pp + rank

    def rank_chunk(self, stage: int) -> tuple[int, int]:
        if self.shape == "v":
            return (stage, 0) if stage < self.pp else (2 * self.pp - 1 - stage, 1)
        return stage % self.pp, stage // self.pp

    def neighbour(self, rank: int, chunk: int, step: int) -> Optional[tuple[int, int]]:
        """(rank, chunk) of the virtual stage ``step`` (+1 next, -1 previous) away, or None."""
        stage = self.stage(rank, chunk) + step
        return self.rank_chunk(stage) if 0 <= stage < self.num_stages else None

    def peer(self, rank: int, kind: Kind, chunk: int) -> Optional[int]:
        """The rank a transfer of ``kind`` for ``chunk`` goes to or comes from; None when there is
        no such neighbour or it is on this rank (a local hand-over)."""
        step = -1 if kind in ("RECV_F", "SEND_B") else 1
        other = self.neighbour(rank, chunk, step)
        return None if other is None or other[0] == rank else other[0]

    def is_first(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == 0

    def is_last(self, rank: int, chunk: int) -> bool:
        return self.stage(rank, chunk) == self.num_stages - 1


class _Builder:
    """Appends one rank's actions; transfers without a remote peer are left out, empty FLUSHes
    too. Micro-batch numbers of transfers are filled in by :func:`_number_transfers`."""

    def __init__(self, placement: Placement, rank: int):
        self.placement, self.rank = placement, rank
        self.actions: list[Action] = []
        self._queued = 0

    def compute(self, kind: Kind, micro: int = -1, chunk: int = 0, defer_w: bool = False) -> None:
        self.actions.append(Action(kind, micro, chunk, defer_w))

    def transfer(self, kind: Kind, chunk: int) -> None:
        if self.placement.peer(self.rank, kind, chunk) is not None:
            self.actions.append(Action(kind, -1, chunk))
            self._queued += 1

    def flush(self) -> None:
        if self._queued:
            self.actions.append(Action("FLUSH"))
            self._queued = 0

    def exchange(self, recv_f: Optional[int] = None, send_f: Optional[int] = None, send_b: Optional[int] = None,
                 recv_b: Optional[int] = None) -> None:
        """One batch in Megatron's order: receive from the previous stage, send to the next, send
        to the previous, receive from the next (the order two ranks that are each other's
        previous and next stage, a ring of two, must agree on). Arguments are chunks."""
        for kind, chunk in (("RECV_F", recv_f), ("SEND_F", send_f), ("SEND_B", send_b), ("RECV_B", recv_b)):
            if chunk is not None:
                self.transfer(kind, chunk)
        self.flush()

    def done(self) -> list[Action]:
        self.flush()
        return _number_transfers(self.actions, self.placement, self.rank)


def _number_transfers(actions: list[Action], placement: Placement, rank: int) -> list[Action]:
    """Give each transfer the micro-batch it carries. Each chunk's inputs arrive in the order
    its forwards consume them (and likewise for output gradients, outputs and input gradients),
    so the n-th ``RECV_F`` of chunk c is the input of the n-th remote-fed ``F`` of chunk c."""
    consumers: dict[tuple[str, int], list[int]] = {}  # (transfer kind, chunk) -> micro-batches in order
    for a in actions:
        for kind in (("RECV_F", "SEND_F") if a.kind == "F" else ("RECV_B", "SEND_B") if a.kind == "B" else ()):
            if placement.peer(rank, kind, a.chunk) is not None:
                consumers.setdefault((kind, a.chunk), []).append(a.micro)
    seen: dict[tuple[str, int], int] = {}
    out = []
    for a in actions:
        if a.kind in TRANSFERS:
            n = seen.get((a.kind, a.chunk), 0)
            seen[(a.kind, a.chunk)] = n + 1
            micros = consumers.get((a.kind, a.chunk), [])
            if n >= len(micros):
                raise AssertionError(f"rank {rank}: {a.kind} number {n + 1} of chunk {a.chunk} has no computation")
            a = Action(a.kind, micros[n], a.chunk)
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------
# generators


def all_forward_all_backward(pp: int, rank: int, num_micro: int) -> list[Action]:
    """Every forward, then every backward (GPipe): the reference; all activations kept."""
    b = _Builder(Placement(pp), rank)
    for m in range(num_micro):
        b.exchange(recv_f=0)
        b.compute("F", m)
        b.exchange(send_f=0)
    for m in range(num_micro):
        b.exchange(recv_b=0)
        b.compute("B", m)
        b.exchange(send_b=0)
    return b.done()


def paired_1f1b(pp: int, rank: int, num_micro: int, vpp: int = 1) -> list[Action]:
    """1F1B (interleaved over ``vpp`` chunks) whose steady state lists each forward right
    before another micro-batch's backward, a pair the interpreter interleaves piece by piece
    (``--overlap-moe-expert-parallel-comm``); at PP 1 it is gradient accumulation with each
    forward paired with the previous micro-batch's backward.

    Rank ``r`` runs ``x = 2 (pp - r - 1) + (vpp - 1) pp + 1`` units of warm-up: unit ``u`` holds
    the ``u``-th forward and the ``(u - x)``-th backward (either may be absent), in the
    interleaved schedule's orders, and one batch of transfers before each unit receives what
    the unit needs and sends what the unit before produced. A pair cannot wait inside itself
    for the neighbour's half of a transfer, so everything a unit needs comes from an earlier
    unit of the neighbour: rank ``r``'s batch ``k`` meets rank ``r + 1``'s batch ``k - 1`` (and,
    across the wrap of the loop, rank ``pp - 1``'s batch ``k + 1 - pp`` meets rank 0's batch
    ``k``). That is why the warm-up counts two forwards per rank after this one, where 1F1B's
    counts one, and a rank keeps up to ``x + 1`` chunk-micro-batches in flight: ``2 (pp - r)``
    without virtual stages, twice 1F1B's ``pp - r``, and one more than interleaved 1F1B's bound
    with them. The ``+ 1`` keeps the last stage's pair from being a micro-batch's own forward
    and backward."""
    if vpp > 1 and num_micro % pp:
        raise ValueError(f"interleaved pipeline: {num_micro} micro-batches is not a multiple of the "
                         f"pipeline size {pp}")
    b = _Builder(Placement(pp, vpp), rank)
    total = num_micro * vpp
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp + 1

    def forward(u: int) -> Optional[tuple[int, int]]:  # (micro-batch, chunk) of unit u's forward
        return (_virtual_micro(u, pp, vpp), _virtual_chunk(u, pp, vpp)) if 0 <= u < total else None

    def backward(u: int) -> Optional[tuple[int, int]]:
        k = u - warmup
        return (_virtual_micro(k, pp, vpp), _virtual_chunk(k, pp, vpp, backward=True)) if 0 <= k < total else None

    def chunk(work: Optional[tuple[int, int]]) -> Optional[int]:
        return None if work is None else work[1]

    for u in range(total + warmup + 1):
        b.exchange(recv_f=chunk(forward(u)), send_f=chunk(forward(u - 1)), send_b=chunk(backward(u - 1)),
                   recv_b=chunk(backward(u)))
        for kind, work in (("F", forward(u)), ("B", backward(u))):
            if work is not None:
                b.compute(kind, *work)
    return b.done()


def one_f_one_b(pp: int, rank: int, num_micro: int) -> list[Action]:
    """1F1B: ``pp - rank - 1`` warm-up forwards, then one forward and one backward at a time; at
    most ``pp - rank`` micro-batches' activations alive. Transfers as Megatron-LM pairs them."""
    b = _Builder(Placement(pp), rank)
    warmup = min(pp - rank - 1, num_micro)
    steady = num_micro - warmup
    for m in range(warmup):
        b.exchange(recv_f=0)
        b.compute("F", m)
        b.exchange(send_f=0)
    if steady:
        b.exchange(recv_f=0)
    for i in range(steady):
        b.compute("F", warmup + i)
        b.exchange(send_f=0, recv_b=0)
        b.compute("B", i)
        b.exchange(recv_f=0 if i < steady - 1 else None, send_b=0)
    for i in range(steady, num_micro):
        b.exchange(recv_b=0)
        b.compute("B", i)
        b.exchange(send_b=0)
    return b.done()


def _virtual_chunk(k: int, pp: int, vpp: int, backward: bool = False) -> int:
    """The chunk of a rank's ``k``-th forward (or backward): groups of ``pp`` micro-batches
    go through chunk 0, then chunk 1, ...; backward visits the chunks in reverse."""
    chunk = (k // pp) % vpp  # Python's floor division: negative k wraps, as the schedule expects
    return vpp - 1 - chunk if backward else chunk


def _virtual_micro(k: int, pp: int, vpp: int) -> int:
    return (k // (pp * vpp)) * pp + k % pp


def interleaved_1f1b(pp: int, rank: int, num_micro: int, vpp: int, forward_only: bool = False) -> list[Action]:
    """Interleaved 1F1B over ``vpp`` chunks (Megatron-LM's order and pairing of transfers).

    Micro-batches go through the chunks in groups of ``pp``; ``2 (pp - rank - 1) + (vpp - 1) pp``
    warm-up forwards, then alternate (all forwards first when there are only ``pp``
    micro-batches). At most ``2 (pp - rank - 1) + (vpp - 1) pp + 1`` chunk-micro-batches'
    activations are alive on a rank. ``num_micro`` must be a multiple of ``pp``."""
    if num_micro % pp:
        raise ValueError(f"interleaved pipeline: {num_micro} micro-batches is not a multiple of the "
                         f"pipeline size {pp}")
    b = _Builder(Placement(pp, vpp), rank)
    total = num_micro * vpp
    warmup = total if forward_only or num_micro == pp else min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    remaining = total - warmup

    def fwd(k: int) -> int:
        chunk = _virtual_chunk(k, pp, vpp)
        b.compute("F", _virtual_micro(k, pp, vpp), chunk)
        return chunk

    def bwd(k: int) -> int:
        chunk = _virtual_chunk(k, pp, vpp, backward=True)
        b.compute("B", _virtual_micro(k, pp, vpp), chunk)
        return chunk

    b.exchange(recv_f=0)
    for k in range(warmup):
        chunk = fwd(k)
        # the last warm-up step also collects the first output gradient
        recv_b = vpp - 1 if k == warmup - 1 and remaining > 0 else None
        b.exchange(recv_f=_virtual_chunk(k + 1, pp, vpp) if k + 1 < total else None, send_f=chunk, recv_b=recv_b)
    for i in range(remaining):
        f_chunk = fwd(warmup + i)
        b_chunk = bwd(i)
        # What arrives now was produced by the neighbour at the same step; across the wrap
        # (rank pp-1 -> rank 0, and back) that neighbour is pp - 1 steps behind in the order.
        if rank == 0:
            sender = _virtual_chunk(warmup + i - (pp - 1), pp, vpp)
            recv_f = sender + 1 if sender != vpp - 1 else None
        else:
            recv_f = _virtual_chunk(warmup + i + 1, pp, vpp)
        if rank == pp - 1:
            sender = _virtual_chunk(i - (pp - 1), pp, vpp, backward=True)
            recv_b = sender - 1 if sender != 0 else None
        else:
            recv_b = _virtual_chunk(i + 1, pp, vpp, backward=True)
        b.exchange(recv_f=recv_f if i < remaining - 1 else None, send_f=f_chunk, send_b=b_chunk, recv_b=recv_b)
    if forward_only:
        return b.done()
    if remaining == 0:
        b.exchange(recv_b=vpp - 1)
    for k in range(remaining, total):
        chunk = bwd(k)
        next_chunk = _virtual_chunk(k + 1, pp, vpp, backward=True)
        b.exchange(send_b=chunk, recv_b=next_chunk if k + 1 < total else None)
    return b.done()


def dualpipev(pp: int, rank: int, num_micro: int) -> list[Action]:
    """DualPipeV (deepseek-ai/DualPipe's ``DualPipeV.step``) on the ``v`` placement.

    Phases: warm-up forwards of chunk 0, then chunk 0 and 1 forwards, then ``B1 W1 F1`` with
    deferred weights, the steady ``F0&B1, F1&B0`` pairs (each pair is what a forward-backward
    overlap would run together), then the drain, whose second half and last steps defer the
    weight gradients into the gaps. Needs ``num_micro >= 2 pp``."""
    if pp < 2:
        raise ValueError("DualPipeV needs a pipeline of at least 2 ranks")
    if num_micro < 2 * pp:
        raise ValueError(f"DualPipeV needs at least 2 x pipeline size = {2 * pp} micro-batches, got {num_micro}")
    b = _Builder(Placement(pp, 2, "v"), rank)
    last = rank == pp - 1
    counts = {"F": [0, 0], "B": [0, 0]}

    def compute(kind: Kind, phase: int, defer_w: bool = False) -> None:
        b.compute(kind, counts[kind][phase], phase, defer_w)
        counts[kind][phase] += 1

    def forward(phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            b.transfer("RECV_F", phase)
        b.flush()
        compute("F", phase)
        if send:
            b.transfer("SEND_F", phase)

    def backward(phase: int, defer_w: bool = False, send: bool = True) -> None:
        b.transfer("RECV_B", phase)
        b.flush()
        compute("B", phase, defer_w)
        if send:
            b.transfer("SEND_B", phase)

    def forward_backward(f_phase: int, b_phase: int, recv_f: bool = True) -> None:
        if recv_f:
            b.transfer("RECV_F", f_phase)
        b.transfer("RECV_B", b_phase)
        b.flush()
        compute("F", f_phase)
        compute("B", b_phase)
        b.transfer("SEND_F", f_phase)
        b.transfer("SEND_B", b_phase)

    def weights() -> None:
        b.flush()
        b.compute("W")

    for _ in range(2 * (pp - rank - 1)):  # 1: chunk-0 warm-up
        forward(0)
    b.transfer("RECV_F", 0)  # 2: both chunks
    for i in range(rank + 1):
        forward(0, recv=False, send=False)
        b.transfer("RECV_F", 0)
        forward(1, send=not last or i < rank)
        b.transfer("SEND_F", 0)
    for _ in range(pp - rank - 1):  # 3: B1 W1 F1, weights deferred into the next forward's slot
        backward(1, defer_w=True)
        b.transfer("RECV_F", 1)
        weights()
        forward(1, recv=False)
    for i in range(num_micro - 2 * pp + rank + 1):  # 4: the steady state
        if i == 0 and last:  # the turn of the V: not paired, to shorten the bubble
            forward(0, recv=False, send=False)
            b.transfer("SEND_F", 1)
            backward(1, send=False)
        else:
            forward_backward(0, 1, recv_f=i > 0)
        forward_backward(1, 0)
    for _ in range(pp - rank - 1):  # 5: drain chunk 1's forwards
        backward(1)
        forward_backward(1, 0)
    defer = False
    for i in range(rank + 1):  # 6: the last backwards, the second half deferring weights
        if i == (rank + 1) // 2 and rank % 2 == 1:
            defer = True
        backward(1, defer_w=defer)
        if i == (rank + 1) // 2 and rank % 2 == 0:
            defer = True
        backward(0, defer_w=defer)
    for _ in range(pp - rank - 1):  # 7: W B0
        weights()
        backward(0, defer_w=True)
    for _ in range(rank + 1):  # 8: the remaining weights
        weights()
    return b.done()


def forward_only(actions: list[Action]) -> list[Action]:
    """The forward part of a schedule (evaluation): its F actions and their transfers, in the
    same order; batches left without transfers are dropped."""
    out: list[Action] = []
    queued = False
    for a in actions:
        if a.kind in ("F", "RECV_F", "SEND_F"):
            out.append(a)
            queued = queued or a.kind != "F"
        elif a.kind == "FLUSH" and queued:
            out.append(a)
            queued = False
    return out


def check_schedule(actions: list[Action], placement: Placement, rank: int, num_micro: int,
                   train: bool = True) -> int:
    """Check one rank's list: every (micro-batch, chunk) is run forward once (and backward once
    after it, when training); a remote input is received, and flushed, before its forward, an
    output gradient before its backward; outputs and input gradients are sent after they exist;
    each ``W`` has a deferred ``B`` before it and none is left over. Returns the most
    micro-batches whose activations are alive at once (forward done, backward not)."""
    done: set[tuple[str, int, int]] = set()
    posted: set[tuple[str, int, int]] = set()  # received and flushed
    queued: list[tuple[str, int, int]] = []
    deferred = alive = peak = 0

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise AssertionError(f"rank {rank}: {what}")

    for a in actions:
        key = (a.micro, a.chunk)
        if a.kind == "F":
            need(("F", *key) not in done, f"{a} runs twice")
            if placement.peer(rank, "RECV_F", a.chunk) is not None:
                need(("RECV_F", *key) in posted, f"{a} before its input is received")
            elif not placement.is_first(rank, a.chunk):
                need(("F", a.micro, a.chunk - 1) in done, f"{a} before the local stage before it")
            done.add(("F", *key))
            alive += train
            peak = max(peak, alive)
        elif a.kind == "B":
            need(train and ("F", *key) in done and ("B", *key) not in done, f"{a} without its forward, or twice")
            if placement.peer(rank, "RECV_B", a.chunk) is not None:
                need(("RECV_B", *key) in posted, f"{a} before its output gradient is received")
            elif not placement.is_last(rank, a.chunk):
                need(("B", a.micro, a.chunk + 1) in done, f"{a} before the local stage after it")
            done.add(("B", *key))
            alive -= 1
            deferred += a.defer_w
        elif a.kind == "W":
            need(deferred > 0, "W without a deferred backward")
            deferred -= 1
        elif a.kind in ("SEND_F", "SEND_B"):
            need((a.kind[-1], *key) in done, f"{a} before its computation")
            queued.append((a.kind, *key))
        elif a.kind in ("RECV_F", "RECV_B"):
            queued.append((a.kind, *key))
        elif a.kind == "FLUSH":
            posted.update(queued)
            queued = []
    need(not queued, "transfers queued after the last FLUSH")
    need(deferred == 0, f"{deferred} deferred weight gradients never run")
    want = {(k, m, c) for m in range(num_micro) for c in range(placement.chunks) for k in ("FB" if train else "F")}
    need(done == want, f"missing {sorted(want - done)[:4]}")
    return peak
