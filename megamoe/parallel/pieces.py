"""A model chunk's forward and backward in pieces, each its own autograd island, so that a
schedule can run the pieces of two micro-batches alternately: while one micro-batch's
all-to-all is in flight, the other computes (Megatron's ``--overlap-moe-expert-parallel-comm``,
DualPipe's overlapped forward-and-backward pairs).

A piece is a function of named values (``reads``) that returns new named values. The runner
keeps the micro-batch's values by name; a tensor a piece reads is handed over detached (a leaf
that collects its gradient), so backward can run piece by piece in reverse: each piece's
outputs are backpropagated with the gradients its readers collected, plus a weight for each
scalar loss it produced. An exchange started in one piece and waited for in the next
(``mappings.start_all_to_all``) keeps working across the cut: the waiting piece's backward
starts the reverse exchange, the starting piece's backward waits for it.

Values that are not tensors (routing handles, exchanges, statistics) are passed as they are.

With ``delay_weight_grads`` (``--delay-wgrad-compute``) a piece's backward computes its input
gradients first and its deferrable weight gradients after it returns: by then the reverse of
the exchange the piece waited for in forward (the dispatch, for the experts' piece) is in
flight, and the weight-gradient GEMMs run beside it instead of before it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megamoe.parallel.weight_grad import WeightGradStore


@dataclass
class Piece:
    name: str
    reads: tuple[str, ...]
    run: Callable[..., dict]  # run(*(value of each name in reads)) -> {name: value}


@dataclass
class _Done:
    inputs: dict[str, tuple[torch.Tensor, tuple[int, str]]]  # read name -> (detached leaf, producer)
    outputs: dict[str, object]


@dataclass
class PieceRun:
    """One micro-batch through one model chunk as ``pieces``. ``values``: what the first pieces
    read (the chunk's input activation, tokens...); ``loss_weights``: the gradient each scalar
    loss output gets (the loss assembly of the training step); ``output``: the name of the
    activation handed to the next pipeline stage, if any."""

    pieces: list[Piece]
    values: dict[str, object]
    loss_weights: dict[str, object]  # name -> a float or a 0-d tensor
    output: Optional[str] = None
    on_forward_done: Optional[Callable[["PieceRun"], None]] = None  # called once every piece has run
    # --delay-wgrad-compute: each piece's deferrable weight gradients run after its backward
    delay_weight_grads: Optional[WeightGradStore] = None
    _done: list[_Done] = field(default_factory=list)
    _producer: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (piece, name) now
    _grads: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self._producer = {name: (-1, name) for name in self.values}

    # ------------------------------------------------------------------ forward

    def forward_steps(self) -> Iterator[None]:
        """Run the pieces one by one, yielding after each."""
        for index, piece in enumerate(self.pieces):
            inputs, args = {}, {}
            for name in piece.reads:
                value = self.values[name]
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    leaf = value.detach().requires_grad_()
                    inputs[name] = (leaf, self._producer[name])
                    value = leaf
                args[name] = value
            outputs = piece.run(*args.values())
            self._done.append(_Done(inputs, outputs))
            for name, value in outputs.items():
                self.values[name] = value
                self._producer[name] = (index, name)
            if index == len(self.pieces) - 1 and self.on_forward_done is not None:
                self.on_forward_done(self)
            yield

    def forward(self) -> None:
        for _ in self.forward_steps():
            pass

    def result(self, name: str):
        return self.values[name]

    # ------------------------------------------------------------------ backward

    def backward_steps(self, grad_output: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Backpropagate piece by piece in reverse, yielding after each; ``grad_output``: the
        gradient of ``output`` from the next stage. The gradient of the chunk's input (the
        values that were given, such as the previous stage's activation) is in :meth:`grad`."""
        if self.output is not None and grad_output is not None:
            self._grads[self._producer[self.output]] = grad_output
        for index in reversed(range(len(self._done))):
            done = self._done[index]
            tensors, grads = [], []
            for name, value in done.outputs.items():
                grad = self._grads.pop((index, name), None)
                if grad is None and name in self.loss_weights and isinstance(value, torch.Tensor):
                    grad = (torch.ones_like(value) * self.loss_weights[name]).to(value.dtype)
                if grad is not None and value.requires_grad:
                    tensors.append(value)
                    grads.append(grad)
            if tensors:
                with self.delay_weight_grads.delayed() if self.delay_weight_grads is not None else nullcontext():
                    torch.autograd.backward(tensors, grads)
            for leaf, producer in done.inputs.values():
                if leaf.grad is not None:
                    previous = self._grads.get(producer)
                    self._grads[producer] = leaf.grad if previous is None else previous + leaf.grad
            for name in done.outputs:  # free the island's activations
                if self._producer.get(name) == (index, name):
                    self.values.pop(name, None)
            done.outputs, done.inputs = {}, {}
            yield

    def backward(self, grad_output: Optional[torch.Tensor] = None) -> None:
        for _ in self.backward_steps(grad_output):
            pass

    def grad(self, name: str) -> Optional[torch.Tensor]:
        """The gradient of a value the run was given (e.g. the chunk's input activation)."""
        return self._grads.get((-1, name))


def interleave(first: Iterator[None], second: Iterator[None]) -> None:
    """Advance two piece runs alternately (a forward and a backward of different micro-batches)
    until both are done: what one starts in a piece runs while the other's next piece computes."""
    runs = [first, second]
    while runs:
        for run in list(runs):
            if next(run, StopIteration) is StopIteration:
                runs.remove(run)
