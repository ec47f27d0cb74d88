#!/usr/bin/env python
"""Train a sentencepiece BPE or unigram tokenizer from JSON-lines or plain-text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/tok --vocab-size 4096
    # -> data/tok.model (for --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model)
    #    and data/tok.vocab

Files ending in .jsonl / .json are read as one JSON object per line (text under --json-keys);
anything else as plain text. Byte fallback is on (no id is ever unknown: unseen characters
become UTF-8 byte tokens), whitespace is kept as is (so detokenize(tokenize(text)) == text
for ordinary text) and digits are split. Ids: 0 <unk>, 1 <s>, 2 </s> (the end-of-document
token). Outputs are written under temporary names and renamed when training is done.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.cli import _OneLineErrorParser  # noqa: E402

PROG = "train_tokenizer.py"


def parse_args(argv: list[str] | None):
    p = _OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="training files (.jsonl/.json: JSON lines; else text)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text in JSON lines (default: text)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="(default: bpe)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes (default: 0.9995)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="train on at most this many lines, sampled (0: all) (default: 2000000)")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longest line in bytes kept (default: 16384)")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="(default: all cores)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default: 1234)")
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    if args.vocab_size < 260:  # 256 byte pieces + <unk>, <s>, </s> + at least one learned piece
        p.error(f"--vocab-size {args.vocab_size}: must be at least 260 with byte fallback")
    if not 0 < args.character_coverage <= 1:
        p.error(f"--character-coverage {args.character_coverage}: must be in (0, 1]")
    for flag in ("input_sentence_size", "max_sentence_length", "num_threads"):
        if getattr(args, flag) < (0 if flag == "input_sentence_size" else 1):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: out of range")
    return p, args


def iter_lines(paths: list[str], json_keys: list[str]) -> Iterator[str]:
    """Non-empty lines of every document (sentencepiece trains on lines)."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, raw in enumerate(f, 1):
                if not path.endswith((".jsonl", ".json")):
                    texts = [raw]
                else:
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"--input {path} line {line_no}: not valid JSON ({err})") from None
                    texts = [obj[k] for k in json_keys if isinstance(obj, dict) and isinstance(obj.get(k), str)]
                for text in texts:
                    for line in text.splitlines():
                        if line.strip():
                            yield line


def train(args) -> None:
    import sentencepiece as spm

    # A first pass reports malformed input with its line number (inside the trainer's iterator an
    # exception would surface as sentencepiece's own error).
    num_lines = sum(1 for _ in iter_lines(args.input, args.json_keys))
    if num_lines == 0:
        raise ValueError(f"--input {' '.join(args.input)}: no text found (--json-keys {' '.join(args.json_keys)})")
    out = Path(args.model_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp")
    tmp = Path(tmp_dir) / out.name
    spm.set_random_generator_seed(args.seed)  # the line sampling, so reruns give the same model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_lines(args.input, args.json_keys), model_prefix=str(tmp),
            vocab_size=args.vocab_size, model_type=args.model_type, character_coverage=args.character_coverage,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
        for suffix in (".vocab", ".model"):  # the .model last: it is what users point at
            os.replace(f"{tmp}{suffix}", f"{out}{suffix}")
    finally:
        for leftover in Path(tmp_dir).iterdir():
            leftover.unlink()
        os.rmdir(tmp_dir)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        train(args)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.model_prefix}.model and .vocab ({args.model_type}, {args.vocab_size} pieces)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
