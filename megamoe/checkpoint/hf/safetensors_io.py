"""Reading and writing Hugging Face model directories, one tensor at a time.

:class:`HFReader` opens ``config.json`` and the safetensors shards (through
``model.safetensors.index.json``, or every ``*.safetensors`` file without one), parses their
headers, and reads single tensors, so no more than the tensor asked for is loaded. FP8
weights with 128 x 128 block scales (DeepSeek-V3's published ``weight`` in float8_e4m3fn with
``weight_scale_inv`` beside it) are dequantized as they are read.

:func:`write_shard` and :func:`write_index` write HF's sharded safetensors and their index.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterable, Optional

import torch

from megamoe.checkpoint.hf.config_map import ConversionError

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")
# safetensors' dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
SAFETENSORS_DTYPES.update({name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
                if hasattr(torch, attr)})


def read_header(path: str) -> tuple[dict, int]:
    """(the header's tensor entries, where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        size = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ConversionError(f"{path}: not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class HFReader:
    """An HF model directory: its config, tensor names, shapes and dtypes, and tensors on demand.

    Tensors are read with ``pread`` into fresh buffers rather than through a memory map: a
    mapping keeps every page it touched resident in the process (about the whole checkpoint
    by the end of an import), where reads leave only the page cache. Thread-safe.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such directory")
        self.path = path
        try:
            with open(os.path.join(path, "config.json")) as f:
                self.config = json.load(f)
        except (OSError, ValueError) as err:
            raise ConversionError(f"{path}/config.json: cannot read it ({err})") from None
        index = self._index()
        files = sorted(set(index.values())) if index is not None else self._bare_files()
        headers = {}
        self.data_start = {}
        for file in files:  # each header read once
            headers[file], self.data_start[file] = read_header(os.path.join(path, file))
        self.file_of = index if index is not None else {name: f for f in files for name in headers[f]}
        self.entries = {name: (file, entry) for file in files for name, entry in headers[file].items()
                        if self.file_of.get(name) == file}
        missing = sorted(set(self.file_of) - set(self.entries))
        if missing:
            raise ConversionError(f"{path}/{INDEX} names {missing[0]} in {self.file_of[missing[0]]}, "
                                  "which does not hold it")
        self.shapes = {name: tuple(entry["shape"]) for name, (_, entry) in self.entries.items()}
        self.dtypes = {name: entry["dtype"] for name, (_, entry) in self.entries.items()}
        unknown = sorted(name for name, dtype in self.dtypes.items() if dtype not in SAFETENSORS_DTYPES)
        if unknown:
            raise ConversionError(f"{path}: tensor {unknown[0]} has dtype {self.dtypes[unknown[0]]}, "
                                  "which this torch cannot hold")
        block = (self.config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
        self.block = tuple(int(b) for b in block)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _index(self) -> Optional[dict[str, str]]:
        """The index's tensor -> shard map, None without an index (one unsharded file)."""
        index = os.path.join(self.path, INDEX)
        if not os.path.exists(index):
            return None
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for file in set(weight_map.values()):
            if not os.path.exists(os.path.join(self.path, file)):
                raise ConversionError(f"{self.path}: shard {file} named by {INDEX} is missing")
        return weight_map

    def _bare_files(self) -> list[str]:
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"{self.path}: no *.safetensors files")
        return files

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(os.path.join(self.path, file), os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def names(self) -> list[str]:
        return list(self.shapes)

    def is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.shapes

    def is_fp8(self, name: str) -> bool:
        return self.dtypes[name].startswith("F8")

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name][1]["data_offsets"]
        return end - begin

    def _raw(self, name: str) -> torch.Tensor:
        file, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        fd, offset, done = self._fd(file), self.data_start[file] + begin, 0
        while done < len(buffer):
            n = os.preadv(fd, [memoryview(buffer)[done:]], offset + done)
            if n == 0:
                raise ConversionError(f"{self.path}/{file}: truncated inside tensor {name}")
            done += n
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(self.shapes[name], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(self.shapes[name])

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``; an FP8 weight comes back dequantized to float32."""
        t = self._raw(name)
        if not self.is_fp8(name):
            return t
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.shapes:
            raise ConversionError(f"{self.path}: {name} is FP8 without {scale_name}")
        return dequantize_blockwise(t, self._raw(scale_name).float(), self.block, name)


def dequantize_blockwise(t: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """``t * scale`` with one scale per ``block`` (rows x columns; the last blocks may be partial)."""
    rows, cols = t.shape
    expect = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != expect:
        raise ConversionError(f"{name}{SCALE_SUFFIX} is {list(scale.shape)}, expected {list(expect)} for "
                              f"{list(t.shape)} in {block[0]}x{block[1]} blocks")
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return t.float() * full


def pack_by_size(items: list, size_of, budget: int) -> list[list]:
    """``items`` in order, cut into consecutive groups of at most ``budget`` bytes (an item larger
    than the budget gets a group of its own): HF's shards, an import's files."""
    groups, size = [[]], 0
    for item in items:
        n = size_of(item)
        if groups[-1] and size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_index(out_dir: str, shards: Iterable[tuple[str, list[str]]], total_bytes: int) -> None:
    """The index transformers reads (only for more than one shard, as HF writes it)."""
    shards = list(shards)
    if len(shards) < 2:
        return
    weight_map = {name: file for file, names in shards for name in names}
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
