"""Tokenizers behind one interface: ``vocab_size``, ``eod``, ``tokenize``, ``detokenize``.

- :class:`SentencePieceTokenizer`: a sentencepiece ``.model`` file (``tools/train_tokenizer.py``
  makes one). The end-of-document token is the model's ``</s>`` (eos), as in Megatron's
  ``GPTSentencePieceTokenizer``; no extra special tokens are added, so ids match sentencepiece.
- :class:`HuggingFaceTokenizer`: a local ``tokenizer.json`` (or a directory holding one), read
  with the ``tokenizers`` library. Nothing is ever downloaded.
- :class:`NullTokenizer`: Megatron's: text is space-separated integer ids, the vocabulary is
  ``vocab_size + 1`` and the extra last id ``vocab_size`` is the end-of-document token.

:func:`build_tokenizer` picks one from a :class:`~megamoe.config.DataConfig`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence

# Megatron-LM's names for a sentencepiece model: today they build the same tokenizer (plain
# sentencepiece ids, eos ends a document, no BOS), and so does megamoe.
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")

# End-of-text tokens of common Hugging Face tokenizers, tried in order when no
# tokenizer_config.json names one.
_KNOWN_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """The interface every tokenizer implements."""

    vocab_size: int
    """Number of token ids (every id is in ``0 .. vocab_size - 1``)."""
    eod: int
    """The end-of-document id that ``--append-eod`` appends."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        raise NotImplementedError


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: ``"3 1 4"`` -> ``[3, 1, 4]``; eod is the extra id ``vocab_size``."""

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"--vocab-size {vocab_size}: must be positive")
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split()]
        if any(not 0 <= i < self.eod for i in ids):
            raise ValueError(f"NullTokenizer: ids must be in 0..{self.eod - 1} (--vocab-size {self.eod})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; eod is its eos id (the model must define one)."""

    def __init__(self, model_file: str):
        import sentencepiece

        if not os.path.isfile(model_file):
            raise ValueError(f"--tokenizer-model {model_file}: no such file")
        self.model_file = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"--tokenizer-model {model_file}: the model has no </s> (eos) piece to end documents")

    def __reduce__(self):  # worker processes reload the model file instead of pickling the processor
        return SentencePieceTokenizer, (self.model_file,)

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face ``tokenizer.json`` (file, or a directory containing it).

    The end-of-document token is ``eos_token`` of a ``tokenizer_config.json`` beside it, else
    the first of the usual end-of-text tokens the vocabulary has.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs the 'tokenizers' package "
                             "(pip install tokenizers)") from None
        self.path = path
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"--tokenizer-model {path}: no tokenizer.json there (local files only; "
                             "nothing is downloaded)")
        self.model_file = str(file)
        self.tok = _HFTokenizer.from_file(str(file))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = _configured_eos(file.parent / "tokenizer_config.json")
        candidates = [eos] if eos else list(_KNOWN_EOS)
        ids = [self.tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"--tokenizer-model {path}: no end-of-text token found (tried {candidates})")
        self.eod = found[0]

    def __reduce__(self):
        return HuggingFaceTokenizer, (self.path,)

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _configured_eos(config_file: Path) -> Optional[str]:
    if not config_file.is_file():
        return None
    try:
        eos = json.loads(config_file.read_text()).get("eos_token")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"--tokenizer-model: {config_file} is not a JSON object") from None
    return eos.get("content") if isinstance(eos, dict) else eos


def build_tokenizer(data_config) -> Tokenizer:
    """The tokenizer a :class:`~megamoe.config.DataConfig` names: ``tokenizer_type`` with
    ``tokenizer_model`` (SentencePiece, Hugging Face) or ``vocab_size`` (NullTokenizer).

    Raises ValueError naming the flag for a missing file, library or argument."""
    kind, model = data_config.tokenizer_type, data_config.tokenizer_model
    if kind == "NullTokenizer":
        return NullTokenizer(data_config.vocab_size)
    if model is None:
        raise ValueError(f"--tokenizer-type {kind} needs --tokenizer-model")
    if kind in SENTENCEPIECE_TYPES or kind == "HuggingFaceTokenizer":
        if not os.path.exists(model):  # the constructor's error names the flag
            return _load(kind, model)
        return _cached(kind, model, os.path.getmtime(model))
    raise ValueError(f"--tokenizer-type {kind}: expected NullTokenizer, {', '.join(SENTENCEPIECE_TYPES)} "
                     "or HuggingFaceTokenizer")


def _load(kind: str, model: str) -> Tokenizer:
    return SentencePieceTokenizer(model) if kind in SENTENCEPIECE_TYPES else HuggingFaceTokenizer(model)


@functools.lru_cache(maxsize=8)
def _cached(kind: str, model: str, mtime: float) -> Tokenizer:
    """A start-up reads the tokenizer several times (validation, notices, the vocabulary, the
    data): each file is loaded once (a rewritten file, with a new mtime, is loaded again)."""
    return _load(kind, model)
