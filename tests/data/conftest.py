"""Fixtures for tests/data: a tiny sentencepiece model and an indexed dataset made with the
NullTokenizer, both built in tmp directories (no network)."""

from __future__ import annotations

import pytest

from datagen import english_docs, null_token_docs, write_jsonl


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A tiny byte-fallback BPE sentencepiece model trained with tools/train_tokenizer.py."""
    import train_tokenizer

    d = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(d / "corpus.jsonl", english_docs(200))
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(d / "tok"), "--vocab-size", "320",
                                 "--num-threads", "1"]) == 0
    return str(d / "tok.model")


@pytest.fixture(scope="session")
def null_dataset(tmp_path_factory) -> tuple[str, list[list[int]]]:
    """(prefix, documents): 60 random-id documents (vocab 50) preprocessed with --append-eod."""
    import preprocess_data

    d = tmp_path_factory.mktemp("null")
    docs = null_token_docs(60, vocab=50)
    write_jsonl(d / "docs.jsonl", [" ".join(map(str, doc)) for doc in docs])
    assert preprocess_data.main(["--input", str(d / "docs.jsonl"), "--output-prefix", str(d / "null"),
                                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--append-eod",
                                 "--log-interval", "0"]) == 0
    return str(d / "null_text_document"), [doc + [50] for doc in docs]
