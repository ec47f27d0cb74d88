"""GPT dataset semantics (split, epochs, samples across document boundaries, shuffling), the
index cache, and blending."""

from __future__ import annotations

import os

import numpy as np
import pytest

import preprocess_data
from datagen import null_token_docs, write_jsonl
from megamoe.config import Config
from megamoe.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.loader import build_dataset


def make_dataset(directory, name, docs, vocab) -> str:
    write_jsonl(directory / f"{name}.jsonl", [" ".join(map(str, d)) for d in docs])
    assert preprocess_data.main(["--input", str(directory / f"{name}.jsonl"), "--output-prefix", str(directory / name),
                                 "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--append-eod",
                                 "--log-interval", "0"]) == 0
    return str(directory / f"{name}_text_document")


def test_split_ranges():
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("98,2", 50) == [(0, 49), (49, 50), None]
    assert split_document_ranges("1/1/2", 8) == [(0, 2), (2, 4), (4, 8)]
    assert parse_split("3,1") == [0.75, 0.25, 0.0]
    for bad in ("", "a,b", "1,-1,0", "0,0,0", "1,2,3,4"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def check_samples(ds: GPTDataset, docs: list[list[int]]) -> None:
    """Every sample is seq_length + 1 consecutive tokens of the shuffled document stream."""
    stream = np.concatenate([docs[d] for d in ds.document_index])
    s = ds.seq_length
    for k in range(len(ds)):
        j = int(ds.shuffle_index[k])
        np.testing.assert_array_equal(ds[k], stream[j * s: j * s + s + 1])


@pytest.mark.parametrize("num_samples, seq_length", [(10, 16), (200, 7), (57, 33)])
def test_samples_cross_documents_and_epochs(null_dataset, tmp_path, num_samples, seq_length):
    prefix, docs = null_dataset
    indexed = IndexedDataset(prefix)
    train_range = split_document_ranges("8,2", len(indexed))[0]
    ds = GPTDataset(indexed, "train", train_range, num_samples, seq_length, seed=5, cache_dir=str(tmp_path))
    assert len(ds) >= num_samples
    tokens = sum(len(docs[i]) for i in range(*train_range))
    assert ds.num_epochs == max(1, -(-(num_samples * seq_length + 1) // tokens))
    # every training document once per epoch (shuffled together, as Megatron does); no validation one
    listed = np.bincount(ds.document_index, minlength=len(indexed))
    assert (listed[slice(*train_range)] == ds.num_epochs).all() and listed[train_range[1]:].sum() == 0
    assert len(set(ds.shuffle_index.tolist())) == len(ds)
    check_samples(ds, docs)


def test_separate_final_epoch(null_dataset, tmp_path):
    prefix, docs = null_dataset
    indexed = IndexedDataset(prefix)
    tokens = int(indexed.sequence_lengths.sum())
    per_epoch = (tokens - 1) // 10
    ds = GPTDataset(indexed, "train", (0, len(indexed)), per_epoch + 3, 10, seed=1, cache_dir=str(tmp_path))
    first = (tokens - 1) // 10  # samples of the first epoch; the few of the second are shuffled apart
    assert ds.num_epochs == 2
    assert sorted(ds.shuffle_index[:first].tolist()) == list(range(first))
    assert sorted(np.asarray(ds.document_index[:len(indexed)]).tolist()) == list(range(len(indexed)))
    check_samples(ds, docs)


def test_cache_rebuilt_when_a_dependency_changes(tmp_path):
    docs = null_token_docs(30, vocab=20, seed=4)
    prefix = make_dataset(tmp_path, "c", docs, 20)
    cache = tmp_path / "cache"

    def build(**overrides):
        args = dict(document_range=(0, 25), num_samples=20, seq_length=8, seed=3)
        args.update(overrides)
        return GPTDataset(IndexedDataset(prefix), "train", cache_dir=str(cache), **args)

    first = build()
    assert first.built and len(list(cache.glob("*.npy"))) == 3
    again = build()
    assert not again.built
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    for change in (dict(seed=4), dict(seq_length=9), dict(num_samples=21), dict(document_range=(0, 24))):
        assert build(**change).built, change
        assert not build(**change).built, change
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))
    # rewriting the data files (same path, new content) selects new indices
    os.utime(prefix + ".idx", ns=(1, 1))
    rewritten = build()
    assert rewritten.built
    # an incomplete cache (a file lost) is rebuilt, not half-loaded
    rewritten.cache.path("sample_index").unlink()
    assert build().built and not build().built


def blend_config(paths, tmp_path, train_iters=50) -> Config:
    cfg = Config()
    cfg.data.data_path = paths
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 60
    cfg.data.data_cache_path = str(tmp_path / "cache")
    cfg.model.seq_length = 8
    cfg.training.train_iters, cfg.training.global_batch_size = train_iters, 8
    return cfg


def test_blending_is_proportional_and_deterministic(tmp_path):
    low = make_dataset(tmp_path, "low", null_token_docs(40, vocab=30, seed=1), 60)  # ids 0..29
    high = make_dataset(tmp_path, "high", [[30 + t for t in d] for d in null_token_docs(40, vocab=30, seed=2)], 60)
    cfg = blend_config(["0.3", low, "0.7", high], tmp_path)
    blend = build_dataset(cfg, "train", 400)
    assert len(blend) == 400
    counts = np.bincount(blend.dataset_index, minlength=2)
    assert counts.tolist() == [120, 280]
    for prefix_len in (10, 99, 400):
        share = np.bincount(blend.dataset_index[:prefix_len], minlength=2) / prefix_len
        assert abs(share[0] - 0.3) <= 1 / prefix_len
    for i in range(len(blend)):  # every sample comes whole from the dataset the index names
        tokens = blend[i][blend[i] != 60]  # 60: the shared end-of-document id
        assert ((tokens >= 30) == bool(blend.dataset_index[i])).all()
    again = build_dataset(cfg, "train", 400)
    np.testing.assert_array_equal(again.dataset_index, blend.dataset_index)
    assert all(np.array_equal(again[i], blend[i]) for i in range(0, 400, 37))
    with pytest.raises(ValueError, match="weight -1 .* must be positive"):
        build_dataset(blend_config(["-1", low, "2", high], tmp_path), "train", 10)
    with pytest.raises(ValueError, match="pairs of WEIGHT PATH"):
        build_dataset(blend_config([low, high], tmp_path), "train", 10)
