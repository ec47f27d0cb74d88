"""Numerics helpers for float32-sensitive math (norms, RoPE, router, cross entropy)."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: bf16/fp16 go to float32, float32/float64 stay as they are
    (so float64 reference tests keep their precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
