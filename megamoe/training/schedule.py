"""Learning-rate schedule: linear warmup, then constant, linear, cosine or WSD decay."""

from __future__ import annotations

import math

from megamoe.config import TrainingConfig


def learning_rate(step: int, t: TrainingConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based).

    Warmup rises linearly to ``lr`` over ``lr_warmup_iters``; decay runs from the end of warmup
    to ``lr_decay_iters`` (default ``train_iters``) and holds ``min_lr`` after it. WSD keeps
    ``lr`` until the last ``lr_wsd_decay_iters`` of the decay window (default 10%), then decays.
    """
    warmup = t.lr_warmup_iters
    if warmup and step <= warmup:
        return t.lr * step / warmup
    decay_end = t.lr_decay_iters or t.train_iters
    if t.lr_decay_style == "constant" or decay_end <= warmup:
        return t.lr
    if step >= decay_end:
        return t.min_lr
    span = t.lr - t.min_lr
    if t.lr_decay_style == "WSD":
        wsd = t.lr_wsd_decay_iters or max(1, int(0.1 * (decay_end - warmup)))
        start = decay_end - wsd
        if step <= start:
            return t.lr
        progress = (step - start) / wsd
        style = t.lr_wsd_decay_style
    else:
        progress = (step - warmup) / (decay_end - warmup)
        style = t.lr_decay_style
    if style == "linear":
        return t.min_lr + span * (1.0 - progress)
    if style == "cosine":
        return t.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "exponential":  # WSD only: geometric from lr to min_lr
        return t.lr * (max(t.min_lr, 1e-12) / t.lr) ** progress
    raise AssertionError(style)
