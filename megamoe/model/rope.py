"""Rotary position embeddings, with YaRN context extension (DeepSeek-V2/V3).

Pairs are interleaved (dimensions 2i and 2i+1 rotate together), as in DeepSeek's released
code, so checkpoints map without permuting weights. Tables are float32 and indexed by explicit
positions, so a sequence shard (context parallel) rotates by its true positions.

YaRN (Peng et al. 2023): frequencies that complete fewer than ``beta_slow`` rotations over the
original context are interpolated by ``1 / factor``, those with more than ``beta_fast`` are kept,
with a linear ramp between. The attention temperature correction is
``mscale(f, m) = 0.1 * m * ln(f) + 1``: the tables are scaled by
``mscale(f, mscale) / mscale(f, mscale_all_dim)`` and the softmax scale by
``mscale(f, mscale_all_dim) ** 2`` (DeepSeek-V2's convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.numerics import upcast


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The dimension whose frequency completes ``num_rotations`` turns over ``max_pos`` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, base: float, yarn: Optional[YarnScaling] = None) -> torch.Tensor:
    """Per-pair angular frequencies (float64), YaRN-blended when ``yarn`` is given."""
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if yarn is None or yarn.factor <= 1.0:
        return extrapolated
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high frequency, kept; 0: low frequency, interpolated
    return extrapolated / yarn.factor * (1 - keep) + extrapolated * keep


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for ``max_positions`` positions of a ``dim``-wide rotary slice."""

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0,
                 yarn: Optional[YarnScaling] = None, device: Optional[torch.device] = None,
                 interpolation: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim, self.max_positions, self.base, self.yarn = dim, max_positions, base, yarn
        self.interpolation = interpolation  # --rotary-seq-len-interpolation-factor: positions / this
        self.table_scale = 1.0
        self.softmax_scale_multiplier = 1.0
        if yarn is not None and yarn.factor > 1.0:
            self.table_scale = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
            self.softmax_scale_multiplier = yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        self.register_buffer("cos", torch.empty(max_positions, dim // 2, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, dim // 2, device=device), persistent=False)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        freqs = inverse_frequencies(self.dim, self.base, self.yarn)
        positions = torch.arange(self.max_positions, dtype=torch.float64) / self.interpolation
        angles = torch.outer(positions, freqs)
        with torch.no_grad():
            self.cos.copy_(angles.cos() * self.table_scale)
            self.sin.copy_(angles.sin() * self.table_scale)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``[s, b, heads, dim]`` by ``positions`` of shape ``[s]``."""
        cos = self.cos[positions].view(x.shape[0], 1, 1, -1).to(upcast(x).dtype)
        sin = self.sin[positions].view(x.shape[0], 1, 1, -1).to(upcast(x).dtype)
        pairs = upcast(x).unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
