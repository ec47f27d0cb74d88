"""Reading and writing Hugging Face model directories, one tensor at a time.

:class:`HFReader` opens ``config.json`` and the safetensors shards (through
``model.safetensors.index.json``, or every ``*.safetensors`` file without one) and reads single
tensors from the memory-mapped files, so no more than the tensor asked for is loaded. FP8
weights with 128 x 128 block scales (DeepSeek-V3's published ``weight`` in float8_e4m3fn with
``weight_scale_inv`` beside it) are dequantized as they are read.

:func:`write_shards` writes named tensors as HF's sharded safetensors with the index.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterable

import torch

from megamoe.checkpoint.hf.config_map import ConversionError

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _safe_open(path: str):
    from safetensors import safe_open

    return safe_open(path, framework="pt")


class HFReader:
    """An HF model directory: its config, tensor names, shapes and dtypes, and tensors on demand
    (thread-safe: each thread keeps its own file handles)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such directory")
        self.path = path
        try:
            with open(os.path.join(path, "config.json")) as f:
                self.config = json.load(f)
        except (OSError, ValueError) as err:
            raise ConversionError(f"{path}/config.json: cannot read it ({err})") from None
        self.file_of = self._weight_map()
        self._local = threading.local()
        self.shapes, self.dtypes = {}, {}
        for file in sorted(set(self.file_of.values())):
            handle = self._handle(file)
            for name in handle.keys():
                if self.file_of.get(name) == file:
                    info = handle.get_slice(name)
                    self.shapes[name] = tuple(info.get_shape())
                    self.dtypes[name] = info.get_dtype()
        missing = sorted(set(self.file_of) - set(self.shapes))
        if missing:
            raise ConversionError(f"{path}/{INDEX} names {missing[0]} in {self.file_of[missing[0]]}, "
                                  "which does not hold it")
        block = (self.config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
        self.block = tuple(int(b) for b in block)

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for file in set(weight_map.values()):
                if not os.path.exists(os.path.join(self.path, file)):
                    raise ConversionError(f"{self.path}: shard {file} named by {INDEX} is missing")
            return weight_map
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"{self.path}: no *.safetensors files")
        return {name: file for file in files for name in _safe_open(os.path.join(self.path, file)).keys()}

    def _handle(self, file: str):
        handles = self._local.__dict__.setdefault("handles", {})
        if file not in handles:
            handles[file] = _safe_open(os.path.join(self.path, file))
        return handles[file]

    def names(self) -> list[str]:
        return list(self.shapes)

    def is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.shapes

    def is_fp8(self, name: str) -> bool:
        return self.dtypes[name].startswith("F8")

    def nbytes(self, name: str) -> int:
        size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4}.get(self.dtypes[name], 2 if not self.is_fp8(name) else 1)
        n = 1
        for d in self.shapes[name]:
            n *= d
        return n * size

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``; an FP8 weight comes back dequantized to float32."""
        t = self._handle(self.file_of[name]).get_tensor(name)
        if t.dtype not in _FP8:
            return t
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.shapes:
            raise ConversionError(f"{self.path}: {name} is FP8 without {scale_name}")
        scale = self._handle(self.file_of[scale_name]).get_tensor(scale_name).float()
        return dequantize_blockwise(t, scale, self.block, name)


def dequantize_blockwise(t: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """``t * scale`` with one scale per ``block`` (rows x columns; the last blocks may be partial)."""
    rows, cols = t.shape
    expect = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != expect:
        raise ConversionError(f"{name}{SCALE_SUFFIX} is {list(scale.shape)}, expected {list(expect)} for "
                              f"{list(t.shape)} in {block[0]}x{block[1]} blocks")
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return t.float() * full


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
