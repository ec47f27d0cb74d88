"""Test data for tests/data, built in memory or tmp directories (no network).

A plain module (not conftest.py) so that worker processes of multi-rank tests import the same
file: ``conftest`` names tests/conftest.py there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # preprocess_data, train_tokenizer

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
