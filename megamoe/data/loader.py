"""What the training loop reads: ``build_data_source(config, split).batch(indices, device)``.

With mock data (the default, or ``--mock-data``) the source is
:class:`~megamoe.data.mock.MarkovMockData`; validation reads the same chain from a far-away
index range. With ``--data-path`` it is a :class:`TokenBatches` over a GPT dataset (or a blend
of several), built for exactly the samples the run reads: ``train_iters * global_batch_size``
(the batch schedule's samples with ``--step-batch-size-schedule``)
for training and ``eval_iters * global_batch_size`` for validation (every evaluation reads the
same validation batches, so evaluations are comparable).

The model's vocabulary comes from the tokenizer when real data is used
(:func:`with_tokenizer_vocab`); mock data uses ``--vocab-size``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megamoe.batch_schedule import BatchSchedule
from megamoe.config import Config, ConfigError
from megamoe.data.blended_dataset import BlendedDataset, parse_blend
from megamoe.data.gpt_dataset import SPLITS, GPTDataset, split_document_ranges
from megamoe.data.index_cache import file_fingerprint
from megamoe.data.indexed_dataset import IndexedDataset, idx_path
from megamoe.data.mock import MarkovMockData
from megamoe.data.tokenizers import build_tokenizer

VALIDATION_OFFSET = 2**40  # mock validation samples live in their own index range


class OffsetSource:
    """A source whose sample ``i`` is sample ``offset + i`` of another (mock validation)."""

    def __init__(self, source: MarkovMockData, offset: int):
        self.source, self.offset = source, offset

    def batch(self, indices: Sequence[int], device: Union[torch.device, str] = "cpu") -> dict[str, torch.Tensor]:
        return self.source.batch([self.offset + i for i in indices], device)


class TokenBatches:
    """Batches of a dataset whose items are [seq_length + 1] token arrays. ``masked_eod``: the
    end-of-document id whose predictions leave the loss (``--eod-mask-loss``), or None."""

    def __init__(self, dataset: Union[GPTDataset, BlendedDataset], seq_length: int, vocab_size: int,
                 masked_eod: Optional[int] = None):
        self.dataset, self.seq_length, self.vocab_size = dataset, seq_length, vocab_size
        self.masked_eod = masked_eod

    def batch(self, indices: Sequence[int], device: Union[torch.device, str] = "cpu") -> dict[str, torch.Tensor]:
        """{"tokens", "labels"}: [m, seq] int64, inputs and next tokens; "loss_mask": [m, seq]
        float32, ones (Megatron's default), or zeros where the input is the end-of-document token
        with ``masked_eod``."""
        array = np.stack([self.dataset[int(i)] for i in indices])  # [m, seq + 1] int64
        if array.size and array.max() >= self.vocab_size:  # else the embedding would silently mask it
            raise ValueError(f"token id {array.max()} in the data is outside the tokenizer's vocabulary of "
                             f"{self.vocab_size}: was the dataset made with another --tokenizer-model?")
        seq = torch.from_numpy(array)
        tokens = seq[:, :-1]
        if self.masked_eod is None:
            loss_mask = torch.ones(len(indices), self.seq_length, device=device)
        else:
            loss_mask = (tokens != self.masked_eod).float().to(device)
        return {"tokens": tokens.to(device), "labels": seq[:, 1:].to(device), "loss_mask": loss_mask}


def with_tokenizer_vocab(config: Config) -> Config:
    """The config with ``data.vocab_size`` set to the tokenizer's vocabulary when real data is
    used (the model pads it by ``--make-vocab-size-divisible-by``); unchanged for mock data.
    NullTokenizer is built from ``--vocab-size`` itself (its end-of-document id is that number):
    its config keeps it, and the model's vocabulary (``model_vocab_size``) gets the extra id, so
    applying this twice changes nothing."""
    if config.data.uses_mock_data:
        return config
    vocab = build_tokenizer(config.data).vocab_size
    if config.data.model_vocab_size is not None and config.data.model_vocab_size < vocab:
        raise ConfigError(f"--model-vocab-size {config.data.model_vocab_size} is smaller than the vocabulary of "
                          f"--tokenizer-model {config.data.tokenizer_model} ({vocab} ids)")
    if config.data.tokenizer_type == "NullTokenizer":
        data = dataclasses.replace(config.data, model_vocab_size=config.data.model_vocab_size or vocab)
    else:
        data = dataclasses.replace(config.data, vocab_size=vocab)
    return dataclasses.replace(config, data=data)


def samples_needed(config: Config, split: str) -> int:
    """Samples the training loop reads from a split (see the module docstring)."""
    t = config.training
    if split == "train":  # the batch schedule's samples (--global-batch-size each without one)
        return BatchSchedule.of(config).consumed_after(t.train_iters)
    return t.eval_iters * t.global_batch_size


def cache_dir_for(config: Config, prefix: str) -> str:
    """``--data-cache-path``, else a ``cache`` directory beside the data."""
    return config.data.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


def build_dataset(config: Config, split: str, num_samples: int) -> Union[GPTDataset, BlendedDataset]:
    """The GPT dataset (or blend) of ``split`` with at least ``num_samples`` samples."""
    d, m = config.data, config.model
    split_id = SPLITS.index(split)
    blend = parse_blend(d.data_path)

    def one(prefix: str, samples: int) -> GPTDataset:
        indexed = IndexedDataset(prefix, mmap_bin=not d.no_mmap_bin_files)
        document_range = split_document_ranges(d.split, len(indexed))[split_id]
        if document_range is None:
            raise ValueError(f"--split {d.split} gives the {split} split no documents")
        return GPTDataset(indexed, split, document_range, samples, m.seq_length, config.training.seed,
                          cache_dir_for(config, prefix), split_spec=d.split)

    if len(blend) == 1:
        return one(blend[0][1], num_samples)
    weights = [w for w, _ in blend]
    description = {"split": split, "split_spec": d.split, "seed": config.training.seed,
                   "seq_length": m.seq_length, "idx": [file_fingerprint(idx_path(p)) for _, p in blend]}
    indices = BlendedDataset.build_indices(weights, num_samples, cache_dir_for(config, blend[0][1]), description)
    counts = np.bincount(indices["dataset_index"], minlength=len(blend))
    datasets = [one(prefix, int(n)) if n else None for n, (_, prefix) in zip(counts, blend)]
    return BlendedDataset(datasets, weights, indices["dataset_index"], indices["dataset_sample_index"])


def build_data_source(config: Config, split: str = "train") -> Union[MarkovMockData, OffsetSource, TokenBatches]:
    """The object ``MicroBatches`` reads ``split`` ('train' or 'valid') from: ``.batch(indices, device)``.

    With real data in a distributed job this is collective: rank 0 builds (or loads) the
    cached indices first, the other ranks wait for it and then load them, as Megatron does.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split {split!r}: expected 'train' or 'valid'")
    if config.data.uses_mock_data:
        mock = MarkovMockData(config.data.vocab_size, config.model.seq_length, config.training.seed)
        return mock if split == "train" else OffsetSource(mock, VALIDATION_OFFSET)
    num_samples = samples_needed(config, split)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        dataset, error = None, None
        if torch.distributed.get_rank() == 0:
            try:
                dataset = build_dataset(config, split, num_samples)
            except Exception as err:  # still reach the barrier, so no rank waits forever
                error = err
        torch.distributed.barrier()  # the cache is complete on disk before the other ranks look
        if error is not None:
            raise error
        if dataset is None:
            dataset = build_dataset(config, split, num_samples)
    else:
        dataset = build_dataset(config, split, num_samples)
    tokenizer = build_tokenizer(config.data)
    return TokenBatches(dataset, config.model.seq_length, tokenizer.vocab_size,
                        masked_eod=tokenizer.eod if config.data.eod_mask_loss else None)
