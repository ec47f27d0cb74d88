"""Small corpora built in tmp directories (no network): JSON lines, a tiny sentencepiece model,
and indexed datasets made with the NullTokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial kings and bold queens sing of ships and stars").split()


def english_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of random words, with newlines and a few non-ASCII characters."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(rng.integers(1, 6))]
        docs.append("\n".join(lines) + (" café №%d" % i if i % 7 == 0 else ""))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def null_token_docs(n: int, vocab: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    """``n`` documents of random ids in [0, vocab), lengths 1..max_len."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, max_len + 1)).tolist() for _ in range(n)]


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
