"""Learning-rate schedule: Megatron-LM's, value for value.

Megatron counts its schedule in samples: each step advances it by the global batch, lengths
given in iterations are multiplied by the global batch (``--train-iters`` runs) and lengths given
in samples are used as they are (``--train-samples`` runs). A step runs at the schedule's value
*before* it advances: step k (1-based) at ``(k - 1) x global_batch_size`` samples (with a batch
schedule, the samples of the steps before it), so with warmup the first step runs at
``--lr-warmup-init``. Steps skipped by the fp16 loss scale do not advance it (the caller passes the
count of steps taken; under a batch schedule they are counted as the run's first steps, which is
Megatron's count where the skips fall at one batch size, as the first steps' do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megamoe.config import TrainingConfig
from megamoe.batch_schedule import BatchSchedule


@dataclass(frozen=True)
class ScheduleLengths:
    """The schedule's lengths in samples (floats: a warmup fraction need not be whole)."""

    warmup: float
    decay: float  # the end of decay, counted from the start (warmup included)
    wsd_decay: float  # WSD: the final decay phase, ending at ``decay``


def schedule_lengths(t: TrainingConfig) -> ScheduleLengths:
    """The lengths of ``t``'s schedule in samples, from its iteration or sample flags."""
    if t.train_samples is not None:
        decay = float(t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples)
        warmup = float(t.lr_warmup_samples)
        wsd = t.lr_wsd_decay_samples
    else:
        gbs = t.global_batch_size
        decay = float((t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters) * gbs)
        warmup = float(t.lr_warmup_iters * gbs)
        wsd = t.lr_wsd_decay_iters * gbs if t.lr_wsd_decay_iters is not None else None
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    if wsd is None:  # megamoe's default where Megatron-LM requires a value
        wsd = 0.1 * max(decay - warmup, 0.0)
    return ScheduleLengths(warmup, decay, float(wsd))


def learning_rate(step: int, t: TrainingConfig, batches: Optional[BatchSchedule] = None) -> float:
    """The learning rate of optimizer step ``step`` (1-based, counting the steps taken), whose
    predecessors consumed ``batches``' sizes (None: ``--global-batch-size`` each)."""
    samples = (step - 1) * t.global_batch_size if batches is None else batches.consumed_after(step - 1)
    return learning_rate_at(samples, t)


def learning_rate_at(samples: float, t: TrainingConfig) -> float:
    """The schedule's value after ``samples`` samples of steps taken."""
    n, lengths = samples, schedule_lengths(t)
    warmup, decay = lengths.warmup, lengths.decay
    if warmup > 0 and n <= warmup:
        return t.lr_warmup_init + (t.lr - t.lr_warmup_init) * n / warmup
    if t.lr_decay_style == "constant":
        return t.lr
    if n > decay:
        return t.min_lr
    if t.lr_decay_style == "inverse-square-root":
        return max(t.min_lr, t.lr * math.sqrt(max(warmup, 1.0)) / math.sqrt(max(n, 1.0)))
    if t.lr_decay_style == "WSD":
        anneal_start = decay - lengths.wsd_decay
        if n <= anneal_start:
            return t.lr
        ratio, style = (n - anneal_start) / lengths.wsd_decay, t.lr_wsd_decay_style
    else:
        ratio, style = (n - warmup) / (decay - warmup), t.lr_decay_style
    return t.min_lr + _coefficient(style, ratio) * (t.lr - t.min_lr)


def _coefficient(style: str, ratio: float) -> float:
    """How much of ``lr - min_lr`` is left at ``ratio`` (0 to 1) of a decay phase."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * 0.5 ** ratio - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise AssertionError(style)
