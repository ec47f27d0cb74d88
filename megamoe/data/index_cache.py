"""On-disk cache of dataset indices, keyed by a hash of everything they depend on.

A dataset describes itself with a JSON-able dict (data files with their size and mtime, split,
seed, sequence length, number of samples, ...). The md5 of that description names the cache
files, so any change selects other files and the indices are rebuilt; an unchanged one loads
the saved arrays memory-mapped. Every file is written under a temporary name and renamed, and
the description is written last, so a crash mid-write never leaves a set that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

FORMAT_VERSION = 1  # bump when the way indices are built changes


def file_fingerprint(path: str) -> dict:
    """Absolute path, size and modification time of a file (a rewritten file changes it)."""
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def description_hash(description: dict) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.md5(text.encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class IndexCache:
    """Arrays named ``{hash}-{kind}-{name}.npy`` in ``directory``, with ``{hash}-{kind}-description.json``."""

    def __init__(self, directory: str, kind: str, description: dict):
        self.directory = Path(directory)
        self.description = description
        self.base = f"{description_hash(description)}-{kind}"

    def path(self, name: str) -> Path:
        return self.directory / f"{self.base}-{name}.npy"

    @property
    def description_path(self) -> Path:
        return self.directory / f"{self.base}-description.json"

    def load(self, names: list[str]) -> Optional[dict[str, np.ndarray]]:
        """The saved arrays (memory-mapped), or None unless all of them and the description exist."""
        paths = [self.path(n) for n in names]
        if not self.description_path.is_file() or not all(p.is_file() for p in paths):
            return None
        return {n: np.load(p, mmap_mode="r") for n, p in zip(names, paths)}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays, then the description (the marker that the set is complete)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the index cache directory {self.directory} ({err.strerror}); "
                             "point --data-cache-path at a writable directory") from None
        for name, array in arrays.items():
            _atomic_write(self.path(name), lambda f, a=array: np.save(f, a, allow_pickle=False))
        _atomic_write(self.description_path,
                      lambda f: f.write(json.dumps(self.description, indent=2, sort_keys=True) + "\n"), mode="w")

    def load_or_build(self, names: list[str], build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict, bool]:
        """(arrays, whether they were built now): load from the cache, or build and save."""
        cached = self.load(names)
        if cached is not None:
            return cached, False
        arrays = build()
        self.save(arrays)
        return arrays, True
