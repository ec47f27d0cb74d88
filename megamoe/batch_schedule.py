"""The global batch size over a run: constant (``--global-batch-size``), or growing with the
samples consumed, as DeepSeek-V3 grew it from 3072 to 15360 sequences over its first 469B tokens.

Megatron-LM's ``--step-batch-size-schedule "0:768 250B:1536 500B:3072"``: from each threshold of
tokens consumed (suffixes K, M, B, T; the training scripts pass the sequence length, so Megatron
reads the thresholds as tokens and divides them by it) the batch is the one after the colon. A
step uses the batch size of the samples consumed before it, so a step that crosses a threshold
still runs at the old size. Its older ``--rampup-batch-size START INCREMENT SAMPLES`` (today
deprecated and ignored by Megatron) grew the batch from START by INCREMENT in equal slices of
SAMPLES up to ``--global-batch-size``; megamoe builds the same steps from it.

Everything that counts samples goes through :class:`BatchSchedule`: which samples a step reads,
the learning-rate schedule's position, the consumed samples a checkpoint records, the steps a
``--train-samples`` run takes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


def parse_count(text: str) -> int:
    """``250B`` -> 250e9; Megatron's suffixes K, M, B, T (decimal); ValueError otherwise."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    number = float(text[:-1] if scale > 1 else text)
    if not math.isfinite(number) or number < 0:
        raise ValueError(text)
    return int(number * scale)


def parse_step_schedule(text: str, seq_length: int) -> list[tuple[int, int]]:
    """``(threshold in samples, batch size)`` entries of a ``--step-batch-size-schedule``,
    thresholds given in tokens (Megatron's reading) and divided by the sequence length."""
    entries = []
    for entry in text.replace(",", " ").split():
        threshold, sep, batch = entry.partition(":")
        if not sep:
            raise ValueError(f"'{entry}' is not THRESHOLD:BATCH_SIZE")
        try:
            entries.append((parse_count(threshold) // seq_length, parse_count(batch)))
        except ValueError:
            raise ValueError(f"'{entry}': THRESHOLD and BATCH_SIZE are counts such as 768 or 250B") from None
    entries.sort()
    if not entries or entries[0][0] != 0:
        raise ValueError("the first threshold must be 0 (the batch size the run starts with)")
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if a == b:
            raise ValueError(f"two entries start at {a} samples (thresholds are tokens / --seq-length)")
    if any(batch <= 0 for _, batch in entries):
        raise ValueError("every batch size must be positive")
    return entries


def rampup_entries(start: int, increment: int, ramp_samples: int, global_batch: int) -> list[tuple[int, int]]:
    """The steps of Megatron-LM's ``--rampup-batch-size``: ``start + k x increment`` from
    ``k x ramp_samples / increments`` samples consumed, ``global_batch`` after ``ramp_samples``."""
    if start <= 0 or increment <= 0 or ramp_samples < 0:
        raise ValueError("START and INCREMENT must be positive, SAMPLES 0 or more")
    if start > global_batch or (global_batch - start) % increment:
        raise ValueError(f"--global-batch-size {global_batch} minus START {start} must be a multiple of "
                         f"INCREMENT {increment} and not negative")
    increments = (global_batch - start) // increment
    if increments == 0 or ramp_samples == 0:
        return [(0, global_batch)]
    per_increment = ramp_samples / increments

    def first_reaching(k: int) -> int:
        # Megatron's batch at c consumed samples is start + int(c / per_increment) x increment
        # while c <= ramp_samples, the global batch after: the first c with int(c / per) >= k,
        # in the same float arithmetic
        c = math.ceil(k * per_increment)
        while c > 0 and int((c - 1) / per_increment) >= k:
            c -= 1
        while int(c / per_increment) < k:
            c += 1
        return c

    entries = [(0, start)] + [(first_reaching(k), start + k * increment) for k in range(1, increments)]
    return entries + [(min(first_reaching(increments), ramp_samples + 1), global_batch)]


@dataclass(frozen=True)
class BatchSchedule:
    """``entries``: ``(threshold, batch size)``, thresholds in samples, the first 0, increasing."""

    entries: tuple[tuple[int, int], ...]

    @classmethod
    def constant(cls, global_batch: int) -> "BatchSchedule":
        return cls(((0, global_batch),))

    @classmethod
    def of(cls, config) -> "BatchSchedule":
        """The schedule a (validated) config's flags give."""
        return _schedule_of(config.training.step_batch_size_schedule, tuple(config.training.rampup_batch_size or ()),
                            config.training.global_batch_size, config.model.seq_length)

    @property
    def final(self) -> int:
        """The last batch size (the run's ``--global-batch-size``)."""
        return self.entries[-1][1]

    @property
    def sizes(self) -> list[int]:
        return [batch for _, batch in self.entries]

    def batch_at(self, consumed: int) -> int:
        """The batch size of a step that starts with ``consumed`` samples consumed."""
        batch = self.entries[0][1]
        for threshold, size in self.entries:
            if consumed < threshold:
                break
            batch = size
        return batch

    def consumed_after(self, steps: int, start: int = 0) -> int:
        """Samples consumed after ``steps`` steps that began with ``start`` consumed."""
        if len(self.entries) == 1:
            return start + steps * self.final
        return self._walk(start, steps=steps)[1]

    def steps_for(self, samples: int) -> int:
        """``--train-samples``: the steps it takes to consume at least ``samples`` (Megatron's
        count for a schedule; a constant batch takes ``samples // batch``, as Megatron does)."""
        if len(self.entries) == 1:
            return samples // self.final
        return self._walk(0, samples=samples)[0]

    def _walk(self, start: int, steps: Optional[int] = None, samples: Optional[int] = None) -> tuple[int, int]:
        """``(steps, consumed)`` after ``steps`` steps, or after the first steps that bring the
        consumed samples to ``samples`` or more: segment by segment, each at one batch size."""
        done, consumed = 0, start
        bounds = [threshold for threshold, _ in self.entries[1:]] + [math.inf]
        for (_, batch), bound in zip(self.entries, bounds):
            if consumed >= bound:
                continue
            wanted = steps - done if steps is not None else max(0, -(-(samples - consumed) // batch))
            n = wanted if bound == math.inf else min(wanted, -(-(bound - consumed) // batch))
            done, consumed = done + n, consumed + n * batch
            if n == wanted:
                break
        return done, consumed


@functools.lru_cache(maxsize=16)
def _schedule_of(text: Optional[str], rampup: tuple, global_batch: int, seq_length: int) -> BatchSchedule:
    if text:
        return BatchSchedule(tuple(parse_step_schedule(text, seq_length)))
    if rampup:
        return BatchSchedule(tuple(rampup_entries(*rampup, global_batch)))
    return BatchSchedule.constant(global_batch)
