"""tools/preprocess_data.py: outputs round-trip through the reader, do not depend on workers or
partitions, malformed lines are skipped (counted) or fatal (with their line number), and a
failed or interrupted run leaves no output that looks valid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import preprocess_data
from datagen import ROOT, english_docs, write_jsonl
from megamoe.data import preprocess as engine
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.tokenizers import SentencePieceTokenizer


def run(capsys, *argv) -> tuple[int, str]:
    code = preprocess_data.main([*map(str, argv), "--log-interval", "0"])
    return code, capsys.readouterr().err


def test_sentencepiece_round_trip_and_layouts(tmp_path, sp_model, capsys):
    docs = english_docs(50, seed=1)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    common = ["--input", src, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod"]
    assert run(capsys, *common, "--output-prefix", tmp_path / "one")[0] == 0
    tok = SentencePieceTokenizer(sp_model)
    ds = IndexedDataset(tmp_path / "one_text_document")
    assert len(ds) == ds.num_documents == 50 and ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i][-1] == tok.eod
        assert tok.detokenize(ds[i][:-1].tolist()) == doc
    # two workers, three partitions (partial files merged): the same bytes
    code, err = run(capsys, *common, "--output-prefix", tmp_path / "par", "--workers", "2", "--partitions", "3")
    assert code == 0 and "docs/s" in err and "MB/s" in err
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"par_text_document{suffix}").read_bytes() == (tmp_path / f"one_text_document{suffix}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "one_text_document.bin", "one_text_document.idx", "par_text_document.bin", "par_text_document.idx"])


def test_null_tokenizer_dataset(null_dataset):
    prefix, docs = null_dataset
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_several_keys_and_empty_documents(tmp_path, capsys):
    lines = [{"a": "1 2", "b": "3"}, {"a": "", "b": "4 4 4"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    code, _ = run(capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--json-keys", "a", "b",
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--append-eod")
    assert code == 0
    a, b = IndexedDataset(tmp_path / "o_a_document"), IndexedDataset(tmp_path / "o_b_document")
    assert [a[i].tolist() for i in range(len(a))] == [[1, 2, 9]]  # the empty document has no sequence...
    assert a.document_indices.tolist() == [0, 1, 1]  # ...but is still a document, as in Megatron
    assert [b[i].tolist() for i in range(len(b))] == [[3, 9], [4, 4, 4, 9]]


BAD = ['{"text": "1 2"}', '{"text": "3"', '["not", "an object"]', '{"other": "5"}', "", '{"text": "6 7"}']


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_skipped_and_counted(tmp_path, capsys, workers):
    (tmp_path / "in.jsonl").write_text("\n".join(BAD) + "\n")
    code, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--workers", workers,
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--on-bad-line", "skip")
    assert code == 0
    assert "line 2: not valid JSON" in err and "line 3: expected a JSON object" in err
    assert "line 4: no string under key 'text'" in err
    assert "skipped 3 malformed lines (lines 2, 3, 4)" in err
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [6, 7]]


def test_bad_line_is_fatal_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("\n".join(BAD) + "\n")
    code, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--partitions", "2")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("preprocess_data.py: error: ")
    assert "line 2: not valid JSON" in err and "--on-bad-line skip" in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]  # no output, no temporary file


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "in.jsonl", [f"{i} {i}" for i in range(50)])
    calls = {"n": 0}
    real = engine._encode_line

    def interrupt_at_40(line):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(line)

    monkeypatch.setattr(engine, "_encode_line", interrupt_at_40)
    code, err = run(capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--partitions", "3")
    assert code == 130 and "no output written" in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


@pytest.mark.parametrize("argv, needle", [
    (["--input", "/nonexistent.jsonl"], "--input /nonexistent.jsonl: no such file"),
    (["--tokenizer-type", "NullTokenizer"], "--tokenizer-type NullTokenizer needs --vocab-size"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "needs --tokenizer-model"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/no.model"], "--tokenizer-model /no.model"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--partitions", "0"], "--partitions 0"),
    (["--on-bad-line", "ignore"], "--on-bad-line"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    write_jsonl(tmp_path / "in.jsonl", ["1"])
    base = {"--input": str(tmp_path / "in.jsonl"), "--output-prefix": str(tmp_path / "o"),
            "--tokenizer-type": "HuggingFaceTokenizer"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        preprocess_data.main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_nothing_valid_looking(tmp_path, sig):
    """Killed while writing: SIGKILL leaves only temporary names; SIGTERM cleans up entirely."""
    rng = np.random.default_rng(0)
    line = json.dumps({"text": " ".join(map(str, rng.integers(0, 1000, size=400)))}) + "\n"
    (tmp_path / "in.jsonl").write_text(line * 8_000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "in.jsonl"),
                             "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
                             "--vocab-size", "1000", "--log-interval", "500"], stderr=subprocess.PIPE, text=True)
    for err_line in proc.stderr:  # wait until documents are being written
        if err_line.startswith("processed"):
            break
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "o_text_document.bin" not in names and "o_text_document.idx" not in names
    if sig == signal.SIGTERM:
        assert names == ["in.jsonl"]
    else:
        assert all(".tmp" in n for n in names if n != "in.jsonl")
