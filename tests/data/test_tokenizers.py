"""Tokenizers: one interface, Megatron's NullTokenizer conventions, sentencepiece and local
Hugging Face files, and tools/train_tokenizer.py."""

from __future__ import annotations

import json
import pickle

import pytest

import train_tokenizer
from datagen import english_docs
from megamoe.config import DataConfig
from megamoe.data.tokenizers import HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer, build_tokenizer


def test_null_tokenizer_is_megatrons():
    tok = build_tokenizer(DataConfig(tokenizer_type="NullTokenizer", vocab_size=100))
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 101 and tok.eod == 100  # the end-of-document id is appended to the vocabulary
    assert tok.tokenize("3 1  4\n1") == [3, 1, 4, 1] and tok.detokenize([3, 1, 4]) == "3 1 4"
    with pytest.raises(ValueError, match="--vocab-size 100"):
        tok.tokenize("100")


def test_sentencepiece_round_trip_and_byte_fallback(sp_model):
    tok = build_tokenizer(DataConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 320 and tok.eod == 2
    text = "the  quick fox\n\tjumps — 日本 42"  # unseen characters fall back to bytes
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and 0 not in ids  # never <unk>
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == ids  # workers reload the model file


def test_train_tokenizer_from_text_and_unigram(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(english_docs(100, seed=3)))
    assert train_tokenizer.main(["--input", str(tmp_path / "a.txt"), "--model-prefix", str(tmp_path / "u"),
                                 "--vocab-size", "300", "--model-type", "unigram", "--num-threads", "1"]) == 0
    tok = SentencePieceTokenizer(str(tmp_path / "u.model"))
    assert tok.vocab_size == 300 and tok.detokenize(tok.tokenize("bold queens")) == "bold queens"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "u.model", "u.vocab"]  # no temporaries left


def test_train_tokenizer_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", "/nonexistent", "--model-prefix", str(tmp_path / "t")])
    assert "--input /nonexistent: no such file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    assert train_tokenizer.main(["--input", str(tmp_path / "bad.jsonl"), "--model-prefix", str(tmp_path / "t"),
                                 "--vocab-size", "300"]) == 1
    assert "bad.jsonl line 2: not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer(DataConfig(tokenizer_type="SentencePieceTokenizer"))
    with pytest.raises(ValueError, match="--tokenizer-model /nope.model: no such file"):
        build_tokenizer(DataConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope.model"))
    with pytest.raises(ValueError, match="--tokenizer-model .*no tokenizer.json"):
        build_tokenizer(DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path)))


def test_hugging_face_tokenizer_from_a_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")  # optional at run time; in the dev extra
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(english_docs(100), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path)))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.eod == 1 and tok.vocab_size == hf.get_vocab_size()
    text = "the lazy dog\nsings"
    assert tok.detokenize(tok.tokenize(text)) == text
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == tok.tokenize(text)
    # an eos_token in tokenizer_config.json wins over the usual names
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert HuggingFaceTokenizer(str(tmp_path / "tokenizer.json")).eod == 0


def test_hugging_face_directory_preprocesses_with_its_ids(tmp_path):
    """tools/preprocess_data.py with --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR:
    the dataset holds the tokenizer's ids, each document ended by its end-of-text id."""
    tokenizers = pytest.importorskip("tokenizers")
    import preprocess_data
    from tokenizers import models, pre_tokenizers, trainers

    from datagen import write_jsonl
    from megamoe.data.indexed_dataset import IndexedDataset

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.train_from_iterator(english_docs(100), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    docs = english_docs(12, seed=5)
    write_jsonl(tmp_path / "in.jsonl", docs)
    assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "hf"),
                                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tok"),
                                 "--append-eod", "--log-interval", "0"]) == 0
    data = IndexedDataset(str(tmp_path / "hf_text_document"))
    tok = HuggingFaceTokenizer(str(tmp_path / "tok"))
    assert len(data) == len(docs)
    for i, doc in enumerate(docs):
        ids = data[i].tolist()
        assert ids == hf.encode(doc, add_special_tokens=False).ids + [1]
        assert tok.detokenize(ids[:-1]) == doc


def test_megatron_sentencepiece_names_are_one_tokenizer(sp_model):
    """Megatron-LM's SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer build
    one tokenizer today (plain ids, eos ends a document, no BOS), and so do megamoe's."""
    text = "bold queens sing"
    made = [build_tokenizer(DataConfig(tokenizer_type=kind, tokenizer_model=sp_model))
            for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")]
    assert {tuple(t.tokenize(text)) for t in made} == {tuple(made[0].sp.encode(text))}
    assert {(t.vocab_size, t.eod) for t in made} == {(320, made[0].sp.eos_id())}


def test_a_tokenizer_file_is_loaded_once_until_it_changes(sp_model, tmp_path):
    """Start-up asks for the tokenizer several times; the file is read once. A rewritten file
    (a new mtime) is read again."""
    import os
    import shutil

    copy = str(tmp_path / "tok.model")
    shutil.copy(sp_model, copy)
    config = DataConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=copy)
    first = build_tokenizer(config)
    assert build_tokenizer(config) is first
    os.utime(copy, (os.path.getatime(copy), os.path.getmtime(copy) + 10))
    assert build_tokenizer(config) is not first
