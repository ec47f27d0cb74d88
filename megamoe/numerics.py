"""Numerics helpers for float32-sensitive math (norms, RoPE, router, cross entropy)."""

from __future__ import annotations

import torch


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 give float32, float32/float64 stay as they are (so float64
    reference tests keep their precision)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`upcast_dtype` of its dtype."""
    return x.to(upcast_dtype(x.dtype))
