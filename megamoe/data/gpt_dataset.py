"""The GPT dataset: fixed-length samples over the documents of an indexed dataset.

Megatron-LM's semantics (``megatron/core/datasets/gpt_dataset.py``):

- ``--split 969,30,1`` divides the documents (contiguous ranges, weights normalised) into
  train / validation / test.
- The number of epochs is the least that yields the samples asked for.
- Document index [epochs * docs] int32: the split's documents once per epoch, the whole array
  shuffled with ``numpy.random.RandomState(seed)``. When the last epoch is needed for fewer
  than 80% of its samples, it is shuffled separately (and its samples too), so that a partial
  epoch does not favour some documents.
- Sample index [samples + 1, 2]: where each sample of ``seq_length + 1`` tokens starts
  (position in the document index, token offset); samples run across document boundaries and
  consecutive samples share one token (the last label is the next sample's first input).
- Shuffle index [samples]: a permutation of the samples (the separated final epoch is permuted
  on its own).

The three indices are cached on disk (:mod:`megamoe.data.index_cache`) under a hash of the
data files and every parameter above. The sample index comes from :mod:`megamoe.data.helpers`
(C++, or numpy with identical results).
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from megamoe.data import helpers
from megamoe.data.index_cache import IndexCache, file_fingerprint
from megamoe.data.indexed_dataset import IndexedDataset, idx_path

SPLITS = ("train", "valid", "test")
_SEPARATE_FINAL_EPOCH_BELOW = 0.80  # Megatron's threshold


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001]; fewer than three weights are padded with zeros (as
    Megatron does: '98,2' means no test split). Raises ValueError naming --split."""
    message = f"--split {split}: expected up to three non-negative weights with a positive sum, such as 969,30,1"
    try:
        weights = [float(x) for x in re.split(r"[,/]", split.strip())]
    except ValueError:
        raise ValueError(message) from None
    if not 1 <= len(weights) <= 3 or any(not 0 <= w < float("inf") for w in weights) or sum(weights) <= 0:
        raise ValueError(message)
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(split: str, num_documents: int) -> list[Optional[tuple[int, int]]]:
    """Per split, the [begin, end) range of documents it owns (None for a zero weight)."""
    bounds, ranges = 0.0, []
    for w in parse_split(split):
        begin, end = bounds, bounds + w
        bounds = end
        ranges.append(None if w == 0 else (int(round(begin * num_documents)), int(round(end * num_documents))))
    return ranges


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """[num_epochs * len(documents)] int32: the documents once per epoch, shuffled."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate([first, build_document_index(documents, 1, rng, False)])
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total): [0, num_first) and [num_first, total) shuffled separately."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


class GPTDataset:
    """``num_samples`` (or more) samples of ``seq_length + 1`` tokens from one split of an
    indexed dataset. ``ds[i]`` -> [seq_length + 1] int64 tokens."""

    def __init__(self, indexed: IndexedDataset, split: str, document_range: tuple[int, int],
                 num_samples: int, seq_length: int, seed: int, cache_dir: str, split_spec: str = ""):
        self.indexed, self.split, self.seq_length = indexed, split, seq_length
        self.num_samples = num_samples
        begin, end = document_range
        self.documents = np.arange(begin, end, dtype=np.int32)
        self.tokens_per_epoch = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        if self.tokens_per_epoch <= 1:
            raise ValueError(f"{indexed.prefix}: the {split} split (--split {split_spec}) has "
                             f"{end - begin} documents and {self.tokens_per_epoch} tokens; it needs more")
        self.num_epochs = self._num_epochs()
        description = {
            "class": "GPTDataset", "idx": file_fingerprint(idx_path(indexed.prefix)),
            "split": split, "split_spec": split_spec, "document_range": [begin, end],
            "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
        }
        self.cache = IndexCache(cache_dir, "GPTDataset", description)
        arrays, self.built = self.cache.load_or_build(
            ["document_index", "sample_index", "shuffle_index"], lambda: self._build(seed))
        self.document_index = arrays["document_index"]  # [epochs * docs] int32
        self.sample_index = arrays["sample_index"]  # [samples + 1, 2] int32 or int64
        self.shuffle_index = arrays["shuffle_index"]  # [samples] uint32 or int64

    def _num_epochs(self) -> int:
        needed = self.num_samples * self.seq_length + 1  # the +1: the last sample's last label
        return max(1, -(-needed // self.tokens_per_epoch))

    def _build(self, seed: int) -> dict[str, np.ndarray]:
        s, per_epoch, epochs = self.seq_length, self.tokens_per_epoch, self.num_epochs
        separate, first_samples = False, None
        if epochs > 1:
            # Samples in the epochs before the last, and the last epoch's share of what is asked.
            first_samples = ((epochs - 1) * per_epoch - 1) // s
            from_final = self.num_samples - first_samples
            per_epoch_samples = (per_epoch - 1) // s
            separate = from_final < int(_SEPARATE_FINAL_EPOCH_BELOW * per_epoch_samples)
        rng = np.random.RandomState(seed)
        document_index = build_document_index(self.documents, epochs, rng, separate)
        total = helpers.num_samples_for(epochs * per_epoch, s)
        sample_index = helpers.build_sample_index(self.indexed.sequence_lengths, document_index, s, total)
        shuffle_index = build_shuffle_index(first_samples if separate else total, total, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sample ``idx``: [seq_length + 1] int64 tokens, read across document boundaries."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range: the {self.split} split of "
                             f"{self.indexed.prefix} was built with {len(self)} samples")
        i = int(self.shuffle_index[idx])
        (doc_first, offset_first), (doc_last, offset_last) = self.sample_index[i], self.sample_index[i + 1]
        doc_first, doc_last = int(doc_first), int(doc_last)
        if doc_first == doc_last:
            parts = [self.indexed.get(int(self.document_index[doc_first]), int(offset_first),
                                      int(offset_last) - int(offset_first) + 1)]
        else:
            parts = [self.indexed.get(int(self.document_index[doc_first]), int(offset_first))]
            parts += [self.indexed.get(int(self.document_index[d])) for d in range(doc_first + 1, doc_last)]
            parts.append(self.indexed.get(int(self.document_index[doc_last]), 0, int(offset_last) + 1))
        sample = np.concatenate(parts).astype(np.int64)
        assert len(sample) == self.seq_length + 1, (len(sample), self.seq_length)
        return sample
