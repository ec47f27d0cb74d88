"""The C++ index builders (megamoe/data/helpers.cpp) against their numpy versions, and both
against hand-worked cases. The C++ extension must be built here (pip install -e . builds it)."""

from __future__ import annotations

import numpy as np
import pytest

from megamoe.data import helpers


def test_cpp_extension_is_built():
    assert helpers.BACKEND == "cpp", (
        "megamoe.data._helpers_cpp is not importable: the C++ helpers were not built. "
        "Run `pip install -e .` (tools/bootstrap_venv.sh does) with a C++ compiler and pybind11; "
        "look for 'WARNING: megamoe's C++ dataset helpers were not built' in its output.")


def test_sample_index_by_hand():
    # documents of 5, 0 and 4 tokens in the order 0, 1, 2; samples of 3 + 1 tokens:
    # tokens 0..3 (doc 0), 3..6 (doc 0 offset 3 .. doc 2 offset 1), 6..9 would need token 9: 2 samples
    sizes = np.array([5, 0, 4], dtype=np.int32)
    order = np.array([0, 1, 2], dtype=np.int32)
    expected = [[0, 0], [0, 3], [2, 1]]
    for build in (helpers.build_sample_index, helpers.build_sample_index_numpy):
        assert build(sizes, order, 3, helpers.num_samples_for(9, 3)).tolist() == expected
    # a start that falls exactly on a document boundary moves to the next non-empty document
    assert helpers.build_sample_index_numpy(sizes, order, 5, 1).tolist() == [[0, 0], [2, 0]]
    assert helpers.build_sample_index(sizes, order, 5, 1).tolist() == [[0, 0], [2, 0]]


@pytest.mark.parametrize("case", range(40))
def test_sample_index_cpp_equals_numpy(case):
    rng = np.random.default_rng(case)
    num_docs = int(rng.integers(1, 60))
    sizes = rng.integers(0, 50, size=num_docs).astype(np.int32)  # empty documents included
    sizes[rng.integers(num_docs)] = int(rng.integers(1, 50))
    epochs = int(rng.integers(1, 5))  # multi-epoch document indices
    order = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
    rng.shuffle(order)
    seq_length = int(rng.integers(1, 40))
    num_samples = helpers.num_samples_for(int(sizes.sum()) * epochs, seq_length)
    cpp = helpers.build_sample_index(sizes, order, seq_length, num_samples)
    ref = helpers.build_sample_index_numpy(sizes, order, seq_length, num_samples)
    assert cpp.dtype == ref.dtype and cpp.shape == (num_samples + 1, 2)
    np.testing.assert_array_equal(cpp, ref)
    # every sample spans seq_length + 1 tokens of the concatenated stream
    starts = np.concatenate([[0], np.cumsum(sizes[order].astype(np.int64))])[cpp[:, 0]] + cpp[:, 1]
    assert (np.diff(starts) == seq_length).all()


def test_large_sample_index_identical():
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 2000, size=20_000).astype(np.int32)
    order = np.tile(np.arange(len(sizes), dtype=np.int32), 3)
    rng.shuffle(order)
    n = helpers.num_samples_for(int(sizes.sum()) * 3, 1024)
    np.testing.assert_array_equal(helpers.build_sample_index(sizes, order, 1024, n),
                                  helpers.build_sample_index_numpy(sizes, order, 1024, n))


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0], [0.5, 0.25, 0.125, 0.125], [1 / 3, 1 / 3, 1 / 3]])
def test_blending_cpp_equals_numpy_and_is_proportional(weights):
    size = 5000
    which, nth = helpers.build_blending_indices(np.array(weights), size)
    ref_which, ref_nth = helpers.build_blending_indices_numpy(np.array(weights), size)
    np.testing.assert_array_equal(which, ref_which)
    np.testing.assert_array_equal(nth, ref_nth)
    assert which.dtype == np.int16 and nth.dtype == np.int64
    for prefix in (10, 137, size):  # every prefix is within one sample of its share
        counts = np.bincount(which[:prefix], minlength=len(weights))
        assert np.abs(counts - np.array(weights) * prefix).max() <= 1.0 + 1e-9
    for i in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert nth[which == i].tolist() == list(range((which == i).sum()))
