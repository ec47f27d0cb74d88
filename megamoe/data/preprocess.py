"""Tokenise a JSON-lines corpus into indexed datasets (the engine of tools/preprocess_data.py).

One ``.bin`` / ``.idx`` pair per JSON key, at ``{output_prefix}_{key}_document``, as
Megatron-LM's ``tools/preprocess_data.py`` names them. Guarantees:

- Atomic outputs: everything is written under temporary names (``...document.tmp<pid>.*``)
  and renamed at the very end (the old ``.idx`` is removed before the new ``.bin`` lands, so
  no moment shows a new ``.bin`` beside an old ``.idx``). A failed or interrupted run removes
  its temporary files; a killed one leaves only ``.tmp`` names, never a valid-looking prefix.
- Malformed lines (bad JSON, not an object, a missing or non-string key) are reported with
  their line number and either abort the run (``on_bad_line="error"``) or are skipped and
  counted (``"skip"``). Blank lines are ignored.
- ``workers`` > 1 tokenises in a process pool; the main process reads and writes, in order,
  so the output does not depend on the number of workers.
- ``partitions`` > 1 cuts the input into that many byte ranges (at line breaks), tokenises
  each into its own partial dataset and merges them at the end, as Megatron's tool does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO

import numpy as np

from megamoe.data.indexed_dataset import IndexedDatasetWriter, best_dtype, bin_path, idx_path
from megamoe.data.tokenizers import Tokenizer

_BATCH_BYTES = 1 << 18  # lines are sent to workers in batches of about this many bytes
_REPORTED_BAD_LINES = 10  # with "skip", print this many bad lines, then only count them


class BadLineError(ValueError):
    """A malformed input line with ``on_bad_line="error"``."""


@dataclass
class Stats:
    """What a run processed; ``bad_lines`` holds (line number, reason) of skipped lines."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    def rate_line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.documents / s:,.0f} docs/s, {self.bytes / 1e6 / s:.2f} MB/s, {self.tokens / s:,.0f} tokens/s)")


# ---------------------------------------------------------------------------------------------
# Workers: parse and tokenise a batch of lines


_worker: dict = {}


def _init_worker(tokenizer: Tokenizer, keys: list[str], append_eod: bool, dtype: type) -> None:
    _worker.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, dtype=dtype)


def _init_pool_worker(*args) -> None:
    # Forked workers inherit the parent's Python signal handlers; a worker only ever needs to die
    # when the pool terminates it, so it gets the default SIGTERM (and ignores Ctrl-C, which the
    # parent handles and then terminates the pool).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def _encode_line(line: bytes) -> tuple[Optional[list[np.ndarray]], Optional[str]]:
    """(one token array per key, None) or (None, why the line is malformed)."""
    tok, keys = _worker["tokenizer"], _worker["keys"]
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"not valid JSON ({err})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    arrays = []
    for key in keys:
        text = obj.get(key)
        if not isinstance(text, str):
            return None, f"no string under key '{key}'" if text is None else f"key '{key}' holds {type(text).__name__}, not a string"
        ids = tok.tokenize(text)
        if ids and _worker["append_eod"]:  # Megatron adds no eod to an empty document
            ids.append(tok.eod)
        arrays.append(np.asarray(ids, dtype=_worker["dtype"]))
    return arrays, None


def _encode_batch(batch: list[tuple[int, bytes]]) -> list[tuple[int, int, Optional[list[np.ndarray]], Optional[str]]]:
    return [(line_no, len(line), *_encode_line(line)) for line_no, line in batch]


# ---------------------------------------------------------------------------------------------
# Input: partitions and batches of lines


def partition_bounds(path: str, partitions: int) -> list[tuple[int, int]]:
    """``partitions`` byte ranges covering the file, each starting at the beginning of a line."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, partitions):
            f.seek(max(cuts[-1], size * k // partitions))
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                f.readline()  # move to the start of the next line
            cuts.append(max(cuts[-1], min(f.tell(), size)))
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def _batches(path: str, begin: int, end: int, first_line_no: int) -> Iterator[list[tuple[int, bytes]]]:
    """Batches of (line number, line) for the lines starting in [begin, end); blank lines skipped."""
    line_no, batch, size = first_line_no, [], 0
    with open(path, "rb") as f:
        f.seek(begin)
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            line_no += 1
            if line.strip():
                batch.append((line_no, line))
                size += len(line)
            if size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _count_lines(path: str, begin: int, end: int) -> int:
    """Line breaks in bytes [begin, end) of the file (the lines of a partition)."""
    count = 0
    with open(path, "rb") as f:
        f.seek(begin)
        while f.tell() < end:
            chunk = f.read(min(16 << 20, end - f.tell()))
            if not chunk:
                break
            count += chunk.count(b"\n")
    return count


# ---------------------------------------------------------------------------------------------
# The run


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's output name: ``{prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _remove(prefix: str) -> None:
    for path in (bin_path(prefix), idx_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


def preprocess(input_path: str, output_prefix: str, tokenizer: Tokenizer, json_keys: list[str],
               append_eod: bool = False, workers: int = 1, partitions: int = 1, on_bad_line: str = "error",
               log_interval: int = 1000, log: Optional[TextIO] = None) -> Stats:
    """Tokenise ``input_path`` into ``{output_prefix}_{key}_document.bin/.idx`` per key.

    Progress lines (every ``log_interval`` documents) and bad-line reports go to ``log``
    (stderr by default). Raises BadLineError for a malformed line with ``on_bad_line="error"``
    and leaves no output then, nor after any other failure.
    """
    log = log or sys.stderr
    dtype = best_dtype(tokenizer.vocab_size)
    finals = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    temps = {key: f"{final}.tmp{os.getpid()}" for key, final in finals.items()}
    bounds = partition_bounds(input_path, partitions)
    part_prefixes = [{key: f"{t}.part{k}" for key, t in temps.items()} for k in range(len(bounds))]
    if len(bounds) == 1:
        part_prefixes = [temps]
    stats, started, created = Stats(), time.perf_counter(), []
    pool = mp.Pool(workers, _init_pool_worker, (tokenizer, json_keys, append_eod, dtype)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer, json_keys, append_eod, dtype)
    try:
        line_no = 0
        for (begin, end), prefixes in zip(bounds, part_prefixes):
            writers = {key: IndexedDatasetWriter(p, dtype) for key, p in prefixes.items()}
            created.extend(prefixes.values())
            batches = _batches(input_path, begin, end, line_no)
            results = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
            for batch in results:
                for number, size, arrays, error in batch:
                    stats.bytes += size
                    if error is not None:
                        _bad_line(stats, input_path, number, error, on_bad_line, log)
                        continue
                    for key, array in zip(json_keys, arrays):
                        writers[key].add_document(array)
                    stats.documents += 1
                    stats.tokens += sum(len(a) for a in arrays)
                    if log_interval and stats.documents % log_interval == 0:
                        stats.seconds = time.perf_counter() - started
                        print(f"processed {stats.rate_line()}", file=log, flush=True)
            for writer in writers.values():
                writer.finalize()
            line_no += _count_lines(input_path, begin, end)
        if len(bounds) > 1:  # merge the partial datasets, in input order
            for key, temp in temps.items():
                merged = IndexedDatasetWriter(temp, dtype)
                created.append(temp)
                for prefixes in part_prefixes:
                    merged.add_index(prefixes[key])
                    _remove(prefixes[key])
                merged.finalize()
        for key, final in finals.items():
            if os.path.exists(idx_path(final)):
                os.remove(idx_path(final))  # never pair a new .bin with an old .idx
            os.replace(bin_path(temps[key]), bin_path(final))
            os.replace(idx_path(temps[key]), idx_path(final))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for prefix in created:
            _remove(prefix)
    stats.seconds = time.perf_counter() - started
    return stats


def _bad_line(stats: Stats, path: str, line_no: int, reason: str, on_bad_line: str, log: TextIO) -> None:
    if on_bad_line == "error":
        raise BadLineError(f"{path} line {line_no}: {reason} (--on-bad-line skip to skip such lines)")
    stats.bad_lines.append((line_no, reason))
    if len(stats.bad_lines) <= _REPORTED_BAD_LINES:
        print(f"skipping {path} line {line_no}: {reason}", file=log, flush=True)
