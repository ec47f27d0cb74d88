#!/usr/bin/env python
"""Tokenise a JSON-lines corpus into Megatron indexed datasets (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2
    # -> data/corpus_text_document.bin / .idx, for --data-path data/corpus_text_document

Flags and outputs follow Megatron-LM's tools/preprocess_data.py, and the files are read by
either project. Progress (documents/s, MB/s, tokens/s) goes to stderr. Outputs appear only
when complete (see megamoe/data/preprocess.py). A bad flag or file is one line on stderr and
exit status 2; a malformed input line with --on-bad-line error is exit status 1.
"""

from __future__ import annotations

import os
import signal
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.cli import _OneLineErrorParser  # noqa: E402
from megamoe.config import DataConfig  # noqa: E402
from megamoe.data.preprocess import BadLineError, output_prefix_for, preprocess  # noqa: E402
from megamoe.data.tokenizers import build_tokenizer  # noqa: E402

PROG = "preprocess_data.py"


def parse_args(argv: list[str] | None):
    p = _OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", required=True, help="JSON-lines file, one document per line")
    p.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenise, one dataset each (default: text)")
    p.add_argument("--tokenizer-type", required=True,
                   choices=typing.get_args(typing.get_type_hints(DataConfig)["tokenizer_type"]))
    p.add_argument("--tokenizer-model", help="sentencepiece .model, or tokenizer.json / its directory")
    p.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are 0..VOCAB_SIZE-1, eod is VOCAB_SIZE")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (default: 1)")
    p.add_argument("--partitions", type=int, default=1,
                   help="split the input into this many parts, tokenised into partial files merged at the end")
    p.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="a malformed line stops the run (error, the default) or is skipped and counted")
    p.add_argument("--log-interval", type=int, default=1000, help="print progress every this many documents")
    args = p.parse_args(argv)
    for flag in ("workers", "partitions"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.log_interval < 0:
        p.error(f"--log-interval {args.log_interval}: must be 0 (off) or positive")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input}: no such file")
    if len(set(args.json_keys)) != len(args.json_keys):
        p.error(f"--json-keys {' '.join(args.json_keys)}: a key is repeated")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        p.error("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.tokenizer_type != "NullTokenizer" and args.vocab_size is not None:
        p.error(f"--vocab-size is only for --tokenizer-type NullTokenizer ({args.tokenizer_type} has its own)")
    return p, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(DataConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                               vocab_size=args.vocab_size or 1))
    except ValueError as err:
        parser.error(str(err))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so temporary files are removed. The
    # previous handler comes back afterwards: main() also runs inside other programs (tests).
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, tokenizer)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, tokenizer) -> int:
    print(f"{PROG}: {args.input} -> {args.output_prefix}_{{{','.join(args.json_keys)}}}_document "
          f"({args.tokenizer_type}, vocab {tokenizer.vocab_size:,}, {args.workers} workers, "
          f"{args.partitions} partitions)", file=sys.stderr, flush=True)
    try:
        stats = preprocess(args.input, args.output_prefix, tokenizer, args.json_keys, append_eod=args.append_eod,
                           workers=args.workers, partitions=args.partitions, on_bad_line=args.on_bad_line,
                           log_interval=args.log_interval)
    except BadLineError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    print(f"{PROG}: done: {stats.rate_line()}", file=sys.stderr)
    if stats.bad_lines:
        shown = ", ".join(str(n) for n, _ in stats.bad_lines[:10])
        print(f"{PROG}: skipped {len(stats.bad_lines)} malformed lines (lines {shown}"
              f"{', ...' if len(stats.bad_lines) > 10 else ''})", file=sys.stderr)
    for key in args.json_keys:
        print(f"{PROG}: wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
