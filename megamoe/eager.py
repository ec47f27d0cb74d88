"""Functions that ``--compile`` must run eagerly, marked without importing dynamo at import time.

``torch.compiler.disable`` imports ``torch._dynamo`` (and sympy with it) when it decorates: about
2.3 s of CPU in every process that imports megamoe, paid by every rank of a launch and by the
test suite's worker and subprocess starts, while only ``--compile`` needs dynamo.
:func:`eager_under_compile` marks a function instead; :func:`disable_marked_for_compile` (called by
``compile_blocks`` before anything is traced) turns every marked function into
``torch.compiler.disable(fn)``, so compiled code calls it eagerly, between two graphs, as the
decorator would have. A marked function called after dynamo was loaded some other way disables
itself on that call.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_MARKED: list[tuple[list[Callable], Callable]] = []  # (the callable a marked function runs, the function)


def eager_under_compile(fn: F) -> F:
    """``fn`` (a function or a method), run eagerly under torch.compile; see the module docstring."""
    target = [fn]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if target[0] is fn and "torch._dynamo" in sys.modules:
            target[0] = torch.compiler.disable(fn)
        return target[0](*args, **kwargs)

    _MARKED.append((target, fn))
    return call  # type: ignore[return-value]


def disable_marked_for_compile() -> None:
    """Make every marked function opaque to dynamo (imports it): before the first compilation."""
    for target, fn in _MARKED:
        if target[0] is fn:
            target[0] = torch.compiler.disable(fn)
