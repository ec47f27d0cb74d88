"""Megatron-LM's indexed dataset: token sequences in a ``.bin`` file, described by an ``.idx``.

The two files share a prefix (``PREFIX.bin``, ``PREFIX.idx``), and the layout is Megatron-LM's
own (``megatron/core/datasets/indexed_dataset.py``), so files written by either tool are read by
the other. All integers are little-endian:

    .idx  b"MMIDIDX\\x00\\x00"            9 bytes, magic
          version          <Q          always 1
          dtype code       <B          Megatron's codes: see DTYPE_CODES
          sequence count   <Q          N
          document count   <Q          M = documents + 1 (document_indices starts with 0)
          sequence lengths int32[N]    tokens per sequence
          sequence pointers int64[N]   byte offset of each sequence in .bin
          document indices int64[M]    sequence index where each document ends; [0] = 0
    .bin  the tokens of every sequence, back to back, in the dtype of the header

GPT preprocessing stores one sequence per document (no sentence splitting), so sequences and
documents coincide, but the reader keeps the distinction. Reading is zero-copy: both files are
memory-mapped and every array returned is a view on the mapping.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34: magic, version, dtype code, two counts

# Megatron's DType enum: the code stored in the header for each token dtype.
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def best_dtype(vocab_size: Optional[int]) -> type:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 tokens, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: Union[str, Path]) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: Union[str, Path]) -> str:
    return f"{prefix}.idx"


def exists(prefix: Union[str, Path]) -> bool:
    """Whether both files of an indexed dataset are present at ``prefix``."""
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def read_header(path: Union[str, Path]) -> tuple[type, int, int]:
    """(token dtype, sequence count, document-index count) of an ``.idx`` file.

    Raises ValueError naming the file when it is not an index of this format."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a Megatron indexed-dataset index (bad magic or truncated header)")
    version, code, num_sequences, num_doc_indices = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise ValueError(f"{path}: index version {version}, expected {VERSION}")
    if code not in CODE_DTYPES:
        raise ValueError(f"{path}: unknown token dtype code {code}")
    return CODE_DTYPES[code], num_sequences, num_doc_indices


def _mmap(path: str) -> np.ndarray:
    """A read-only uint8 view of a file (an empty array for an empty file, which mmap refuses)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class IndexedDataset:
    """Read-only access to ``PREFIX.bin`` / ``PREFIX.idx``: memory-mapped, or with
    ``mmap_bin=False`` (``--no-mmap-bin-files``) the ``.bin`` read with one ``pread`` per slice,
    for file systems where mapping a large file is slow. Both return the same tokens.

    ``ds[i]`` is sequence ``i`` (a 1-D array view in the file's token dtype); ``ds.get(i,
    offset, length)`` a slice of it without reading the rest. ``sequence_lengths`` [N] int32,
    ``sequence_pointers`` [N] int64 and ``document_indices`` [documents + 1] int64 are views on
    the index file.
    """

    def __init__(self, prefix: Union[str, Path], mmap_bin: bool = True):
        self.prefix = str(prefix)
        if not exists(self.prefix):
            raise FileNotFoundError(f"indexed dataset {self.prefix}: {self.prefix}.bin and .idx are needed")
        self.dtype, n, m = read_header(idx_path(self.prefix))
        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * m
        idx_size = os.path.getsize(idx_path(self.prefix))
        if idx_size < expected:
            raise ValueError(f"{idx_path(self.prefix)}: {idx_size} bytes, the header promises {expected}")
        self._idx = _mmap(idx_path(self.prefix))
        buf, at = self._idx, HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n, offset=at)
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=at + 4 * n)
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=m, offset=at + 12 * n)
        self._bin = _mmap(bin_path(self.prefix)) if mmap_bin else None
        self._bin_fd = None if mmap_bin else os.open(bin_path(self.prefix), os.O_RDONLY)
        itemsize = np.dtype(self.dtype).itemsize
        needed = int(self.sequence_pointers[-1]) + itemsize * int(self.sequence_lengths[-1]) if n else 0
        bin_size = os.path.getsize(bin_path(self.prefix))
        if bin_size < needed:
            raise ValueError(f"{bin_path(self.prefix)}: {bin_size} bytes, the index needs {needed} "
                             "(truncated or mismatched .bin)")
        if m == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise ValueError(f"{idx_path(self.prefix)}: document indices must run from 0 to the "
                             f"sequence count {n}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sequence ``idx``: [length] tokens, a view on the mapped ``.bin``."""
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``idx`` (to its end when length is None)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({len(self)} sequences)")
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}..{offset + length} out of range for sequence {idx} of length {size}")
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.sequence_pointers[idx]) + offset * itemsize
        if self._bin is None:  # --no-mmap-bin-files
            return np.frombuffer(os.pread(self._bin_fd, length * itemsize, start), dtype=self.dtype)
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __del__(self) -> None:
        if getattr(self, "_bin_fd", None) is not None:
            os.close(self._bin_fd)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


class IndexedDatasetWriter:
    """Write an indexed dataset: append documents, then :meth:`finalize` writes the index.

    Writes go to ``PREFIX.bin`` / ``PREFIX.idx`` exactly as given; callers that need atomic
    outputs pass temporary prefixes and rename (see ``tools/preprocess_data.py``).
    """

    def __init__(self, prefix: Union[str, Path], dtype: type):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"token dtype {dtype} has no Megatron code")
        self.prefix, self.dtype = str(prefix), dtype
        self._bin = open(bin_path(self.prefix), "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_document(self, tokens: Union[np.ndarray, Sequence[int]], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document; ``lengths`` splits it into sequences (default: one sequence).
        An empty document with no lengths adds a document of zero sequences, as Megatron does."""
        array = np.asarray(tokens)
        info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
        if array.size and info is not None and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"token ids {array.min()}..{array.max()} do not fit {np.dtype(self.dtype).name}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        if lengths is None:
            lengths = [array.size] if array.size else []
        assert sum(lengths) == array.size, "sequence lengths must add up to the document length"
        self.sequence_lengths.extend(int(x) for x in lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, prefix: Union[str, Path]) -> None:
        """Append every document of another indexed dataset of the same dtype (used to merge
        partial outputs)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {np.dtype(other.dtype).name}, expected {np.dtype(self.dtype).name}")
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + base).tolist())
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self._bin.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:  # sequence i starts where i-1 ended, in bytes
            np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path(self.prefix), "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], len(lengths), len(self.document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.asarray(self.document_indices, dtype=np.int64).tobytes())

    def abort(self) -> None:
        """Close and delete both files (after a failure)."""
        self._bin.close()
        for path in (bin_path(self.prefix), idx_path(self.prefix)):
            if os.path.exists(path):
                os.remove(path)
