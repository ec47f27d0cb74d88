"""Index builders for the GPT and blended datasets: C++ when built, numpy otherwise.

``setup.py`` compiles ``helpers.cpp`` into ``megamoe.data._helpers_cpp`` when a compiler is
there; :func:`build_sample_index` and :func:`build_blending_indices` use it when it imports and
fall back to the numpy versions below, which return identical arrays (``tests/data`` checks).
``BACKEND`` says which one is in use.
"""

from __future__ import annotations

import numpy as np

try:
    from megamoe.data import _helpers_cpp
except ImportError:  # no compiler at install time: the numpy versions serve
    _helpers_cpp = None

BACKEND = "cpp" if _helpers_cpp is not None else "numpy"
_INT32_MAX = np.iinfo(np.int32).max


def num_samples_for(num_tokens: int, seq_length: int) -> int:
    """Samples of ``seq_length + 1`` tokens (sharing one token with the next) in ``num_tokens``."""
    return max(0, (num_tokens - 1) // seq_length)


def _index_dtype(num_docs: int) -> type:
    # Offsets fit int32 (document sizes are int32); positions fit while the index is short.
    return np.int32 if num_docs < _INT32_MAX else np.int64


def build_sample_index_numpy(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                             num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (position in ``document_index``, token offset) where each sample starts.

    Sample ``i`` covers tokens ``i*seq_length .. i*seq_length + seq_length`` (inclusive) of the
    documents concatenated in ``document_index`` order; row ``i + 1`` is where it ends and the
    next one starts. A start never rests at the end of a document (it moves on to the next
    non-empty one), and row 0 is (0, 0): Megatron's convention.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index)]
    ends = np.cumsum(lengths)  # [D] token position where each listed document ends
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and starts[-1] >= ends[-1]:
        raise ValueError(f"{num_samples} samples of {seq_length} need more than {int(ends[-1])} tokens")
    doc = np.searchsorted(ends, starts, side="right")
    before = np.concatenate([[0], ends])[doc]  # tokens before that document
    out = np.stack([doc, starts - before], axis=1).astype(_index_dtype(len(lengths)))
    out[0] = 0
    return out


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """:func:`build_sample_index_numpy`, computed in C++ when the extension is built."""
    if _helpers_cpp is None:
        return build_sample_index_numpy(sizes, document_index, seq_length, num_samples)
    use_int64 = _index_dtype(len(document_index)) == np.int64
    return _helpers_cpp.build_sample_index(np.ascontiguousarray(sizes, dtype=np.int32),
                                           np.ascontiguousarray(document_index, dtype=np.int32),
                                           seq_length, num_samples, use_int64)


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: sample ``s`` comes from the dataset whose share lags its
    weight most, ``weights[i] * max(s, 1) - drawn[i]`` (the first such on ties).

    Returns ([size] int16 dataset of each sample, [size] int64 its index within that dataset).
    A plain loop (the C++ version is ~100x faster); the arithmetic is the same IEEE doubles.
    """
    w = [float(x) for x in np.asarray(weights, dtype=np.float64)]
    drawn = [0] * len(w)
    which = np.empty(size, dtype=np.int16)
    nth = np.empty(size, dtype=np.int64)
    for s in range(size):
        x = float(s) if s > 1 else 1.0
        best, best_error = 0, w[0] * x - drawn[0]
        for i in range(1, len(w)):
            error = w[i] * x - drawn[i]
            if error > best_error:
                best, best_error = i, error
        which[s], nth[s] = best, drawn[best]
        drawn[best] += 1
    return which, nth


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_blending_indices_numpy`, computed in C++ when the extension is built."""
    if _helpers_cpp is None:
        return build_blending_indices_numpy(weights, size)
    return _helpers_cpp.build_blending_indices(np.ascontiguousarray(weights, dtype=np.float64), size)
