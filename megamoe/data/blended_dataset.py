"""Blending: samples drawn from several datasets in proportion to weights, deterministically.

``--data-path 0.3 A 0.7 B`` builds a GPT dataset per prefix and a blending index over them with
Megatron's greedy rule (``megatron/core/datasets/blended_dataset.py``): sample ``s`` comes from
the dataset whose share so far lags its weight the most, so after any number of samples every
dataset's count is within one of ``weight * samples``. The index depends only on the weights
and the size; it is cached like the GPT indices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megamoe.data import helpers
from megamoe.data.index_cache import IndexCache


def parse_blend(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """``['A']`` -> [(1.0, 'A')]; ``['0.3', 'A', '0.7', 'B']`` -> [(0.3, 'A'), (0.7, 'B')] with the
    weights normalised. Raises ValueError naming --data-path."""
    items = list(data_path)
    if len(items) == 1:
        return [(1.0, items[0])]
    shown = " ".join(items)
    if not items or len(items) % 2:
        raise ValueError(f"--data-path {shown}: expected one PATH, or pairs of WEIGHT PATH")
    pairs = []
    for weight, path in zip(items[::2], items[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--data-path {shown}: '{weight}' is not a weight (expected pairs of WEIGHT PATH)") from None
        if not 0 < w < float("inf"):
            raise ValueError(f"--data-path {shown}: weight {weight} of {path} must be positive")
        pairs.append((w, path))
    total = sum(w for w, _ in pairs)
    return [(w / total, path) for w, path in pairs]


class BlendedDataset:
    """``size`` samples; ``ds[i]`` is sample ``dataset_sample_index[i]`` of dataset
    ``dataset_index[i]``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray):
        self.datasets, self.weights = list(datasets), list(weights)
        self.dataset_index = dataset_index  # [size] int16
        self.dataset_sample_index = dataset_sample_index  # [size] int64

    @staticmethod
    def build_indices(weights: Sequence[float], size: int, cache_dir: str, description: dict) -> dict[str, np.ndarray]:
        """The blending index for ``size`` samples, from the cache when ``description`` matches."""
        cache = IndexCache(cache_dir, "BlendedDataset", {"class": "BlendedDataset", "weights": list(weights),
                                                         "size": size, **description})

        def build():
            which, nth = helpers.build_blending_indices(np.asarray(weights, dtype=np.float64), size)
            return {"dataset_index": which, "dataset_sample_index": nth}

        return cache.load_or_build(["dataset_index", "dataset_sample_index"], build)[0]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range: the blend was built with {len(self)} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
