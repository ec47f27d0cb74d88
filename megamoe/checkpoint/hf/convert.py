"""Hugging Face <-> megamoe checkpoints, streamed tensor by tensor (``tools/convert_checkpoint.py``).

Import writes a megamoe checkpoint at iteration 0 (``OUT/iter_0000000``, the tracker, and
``OUT/megamoe.yaml`` with the model's flags) that ``--load`` or ``--finetune`` reads in any
layout: DCP's writer threads ask for one HF tensor at a time (:class:`_StreamingSavePlanner`),
which is read from the memory-mapped safetensors, dequantized if FP8, permuted if its RoPE
convention differs, and written as one piece (a routed expert is a box of the stacked expert
tensor), into files of at most 500 MB. Peak memory: per writer thread, one file's tensors and
the one being converted (:func:`import_memory_bytes`).

Export reads a megamoe checkpoint saved in any layout and writes HF's sharded safetensors, one
output shard per task: each megamoe tensor a shard needs is read once, as the box covering the
shard's pieces of it (DCP reads the stored pieces that overlap it). Peak memory: per worker,
one output shard plus the stored pieces its boxes overlap.

Both write into ``OUT.tmp`` and rename it to ``OUT`` at the end, so a failed or killed
conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megamoe.checkpoint.hf.config_map import (ConversionError, family_of_config, hf_config, megamoe_values,
                                              values_to_config)
from megamoe.checkpoint.hf.safetensors_io import (SAFETENSORS_DTYPES, TOKENIZER_FILES, HFReader, pack_by_size,
                                                  shard_names, write_index, write_shard)
from megamoe.checkpoint.hf.tensor_map import TensorMap, is_mtp_tensor, tensor_maps, to_half_split, to_interleaved
from megamoe.config import SECTIONS, Config, section_of
from megamoe.config_validation import validate
from megamoe.model.args import GPTArgs, gpt_args
from megamoe.progress import Progress
from megamoe.training.checkpoint import (TRACKER, CheckedFileSystemWriter, Piece, PieceLoadPlanner, first_failure,
                                         iteration_dir, latest_iteration, read_common, write_common)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# transformers' name for each dtype in config.json
_HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# one process converting: DCP's single-process warning says nothing here
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _half_split_rope(family: str, rope_interleave: bool = True) -> bool:
    return family in ("mixtral", "qwen3_moe") or (family == "deepseek_v3" and not rope_interleave)


def _start_output(out: str) -> str:
    if os.path.exists(out):
        raise ConversionError(f"{out} exists; give a new output directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"{parent}: not writable")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed earlier
    os.makedirs(tmp)
    return tmp


# ---------------------------------------------------------------------------------------------
# import


@dataclass
class ImportPlan:
    family: str
    config: Config
    values: dict
    maps: list[TensorMap]
    skipped: list[str]  # HF tensors deliberately not imported (MTP layers not asked for, a tied head)
    reader: HFReader


def plan_import(hf_dir: str, mtp_num_layers: int = 0) -> ImportPlan:
    """Read the HF config and tensor index, check them against each other; no tensor is read."""
    reader = HFReader(hf_dir)
    family, values = megamoe_values(reader.config, mtp_num_layers)
    config = values_to_config(values)
    validate(config, 1)
    gpt = gpt_args(config)
    maps = [m for m in tensor_maps(gpt, family, _half_split_rope(family, values.get("rope_interleave", True)))
            if not m.export_only]
    wanted = {m.hf for m in maps}
    for m in maps:
        if m.hf not in reader.shapes:
            raise ConversionError(f"{hf_dir}: tensor {m.hf} is missing (config.json describes a model that has it)")
        if reader.shapes[m.hf] != m.shape:
            raise ConversionError(f"{hf_dir}: tensor {m.hf} is {list(reader.shapes[m.hf])} in the weights, "
                                  f"{list(m.shape)} from config.json")
    skipped = []
    for name in reader.names():
        if name in wanted or reader.is_scale(name) or name.endswith("rotary_emb.inv_freq"):
            continue
        if is_mtp_tensor(name, gpt.num_layers) or (name == "lm_head.weight" and gpt.tie_embeddings):
            skipped.append(name)
            continue
        raise ConversionError(f"{hf_dir}: unexpected tensor {name} (config.json describes a model without it)")
    return ImportPlan(family, config, values, maps, skipped, reader)


class _StreamingSavePlanner(DefaultSavePlanner):
    """Writes each map as a piece of its megamoe tensor; the data is read only when DCP's
    writer asks for it (:meth:`resolve_data`), one tensor at a time per writer thread."""

    def __init__(self, maps: list[TensorMap], dtypes: dict[str, torch.dtype], load: Callable[[TensorMap], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.maps = {(m.fqn, m.offsets): m for m in maps}
        self.dtypes, self.load = dtypes, load

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(m.fqn, torch.Size(m.offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(m.offsets), torch.Size(m.box)),
                                                       properties=TensorProperties(dtype=self.dtypes[m.fqn]),
                                                       size=torch.Size(m.global_shape)))
                 for m in self.maps.values()]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        m = self.maps[(write_item.index.fqn, tuple(write_item.index.offset))]
        return self.load(m).reshape(m.box)


class _BoundedFileWriter(CheckedFileSystemWriter):
    """Writes the pieces in plan order into files of at most ``file_bytes`` each (a larger
    piece gets its own), over ``thread_count`` threads. DCP's writer keeps every tensor of a
    file until the file is closed, and by default makes one file per thread: an import would
    then hold most of the model in memory by the end."""

    def __init__(self, path: str, thread_count: int, file_bytes: int):
        super().__init__(path, thread_count=thread_count)
        self.file_bytes = file_bytes

    def write_data(self, plan, planner):
        if not hasattr(self, "_write_data"):  # another torch's writer: its own file split
            return super().write_data(plan, planner)
        def size_of(item) -> int:
            return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize

        files: queue.Queue = queue.Queue()
        for i, items in enumerate(pack_by_size(plan.items, size_of, self.file_bytes)):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._checked(plan, self._write_data(planner, files))


def _import_dtype(plan: ImportPlan, m: TensorMap, dtype: Optional[torch.dtype]) -> torch.dtype:
    if m.keeps_float32:
        return torch.float32
    if dtype is not None:
        return dtype
    if plan.reader.is_fp8(m.hf):
        return torch.bfloat16
    return SAFETENSORS_DTYPES[plan.reader.dtypes[m.hf]]


# the interpreter with torch imported, measured (tools/bench_convert.py)
PROCESS_BASE_BYTES = 250 * 10**6
# the size of the files an import writes (each writer thread holds one file's tensors)
IMPORT_FILE_BYTES = 500 * 10**6


def import_memory_bytes(plan: ImportPlan, workers: int) -> int:
    """Peak bytes the import holds: per writer thread, the file it is writing (DCP keeps its
    tensors until it closes) and its largest tensor three times over (as read, converted, and
    DCP's serialisation buffer; an FP8 weight nine times its bytes: read, float32 dequantized,
    converted, serialised)."""
    largest = max(plan.reader.nbytes(m.hf) * (9 if plan.reader.is_fp8(m.hf) else 3) for m in plan.maps)
    total = sum(plan.reader.nbytes(m.hf) for m in plan.maps)
    files = max(1, -(-total // IMPORT_FILE_BYTES))
    return PROCESS_BASE_BYTES + min(workers, files) * (min(IMPORT_FILE_BYTES, total) + largest)


def yaml_text(plan: ImportPlan, hf_dir: str) -> str:
    import yaml

    sections: dict[str, dict] = {}
    for name, value in plan.values.items():
        if name != "rope_interleave":
            sections.setdefault(section_of(name), {})[name] = value
    header = (f"# {plan.family} imported from {os.path.abspath(hf_dir)} by tools/convert_checkpoint.py.\n"
              "# The model flags must stay as they are to --load this checkpoint. The balancing loss and its\n"
              "# coefficient are the family's published choice; batch sizes, learning rate and the parallel\n"
              "# layout are megamoe's defaults: set them for your run.\n")
    return header + yaml.safe_dump({s: sections[s] for s in SECTIONS if s in sections}, sort_keys=False)


def import_hf(hf_dir: str, out: str, mtp_num_layers: int = 0, dtype: Optional[torch.dtype] = None,
              workers: int = 4, quiet: bool = False) -> str:
    """Convert the HF directory ``hf_dir`` into the megamoe checkpoint directory ``out``."""
    plan = plan_import(hf_dir, mtp_num_layers)
    tmp = _start_output(out)
    progress = Progress(sum(plan.reader.nbytes(m.hf) for m in plan.maps), "import", quiet=quiet)
    dtypes = {}
    for m in plan.maps:
        dtypes.setdefault(m.fqn, _import_dtype(plan, m, dtype))

    def load(m: TensorMap) -> torch.Tensor:
        t = to_interleaved(plan.reader.read(m.hf), m.rope).to(dtypes[m.fqn])
        progress.advance(plan.reader.nbytes(m.hf))
        return t

    try:
        try:
            writer = _BoundedFileWriter(iteration_dir(tmp, 0), thread_count=workers, file_bytes=IMPORT_FILE_BYTES)
            dcp.save({}, storage_writer=writer,
                     planner=_StreamingSavePlanner(plan.maps, dtypes, load), no_dist=True)
        except CheckpointException as err:  # DCP wraps the cause with its traceback
            raise ConversionError(f"writing {out} failed: {first_failure(err)}") from None
        progress.close()
        # no optimizer state and a layout no run has: --load starts Adam fresh and re-seeds the RNGs
        write_common(iteration_dir(tmp, 0), 0, 0, 0, {"imported_from": os.path.abspath(hf_dir)}, None, plan.config)
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write("0")
        with open(os.path.join(tmp, "megamoe.yaml"), "w") as f:
            f.write(yaml_text(plan, hf_dir))
        _copy_tokenizer(hf_dir, os.path.join(tmp, "tokenizer"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        plan.reader.close()
    os.rename(tmp, out)
    return out


def _copy_tokenizer(src: Optional[str], dst: str) -> list[str]:
    found = [f for f in TOKENIZER_FILES if src and os.path.exists(os.path.join(src, f))]
    if found:
        os.makedirs(dst, exist_ok=True)
        for f in found:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return found


# ---------------------------------------------------------------------------------------------
# export


def _config_from_common(common: dict) -> Config:
    from megamoe.cli import config_from_values

    values = {}
    for section in common["config"].values():
        for name, value in section.items():
            try:
                section_of(name)
            except KeyError:  # a field of another megamoe version that this one does not have
                continue
            values[name] = value
    return config_from_values(values)


def checkpoint_iteration_dir(path: str) -> str:
    """``path`` itself when it is one iteration's directory, else the tracker's iteration in it."""
    if os.path.exists(os.path.join(path, "common.json")):
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        raise ConversionError(f"{path}: neither a megamoe checkpoint directory ({TRACKER}) nor an iteration's")
    return iteration_dir(path, iteration)


@dataclass
class ExportPlan:
    family: str
    hf_config: dict
    gpt: GPTArgs
    path: str  # the iteration directory
    shards: list[list[TensorMap]]
    stored: dict  # fqn -> its TensorStorageMetadata
    dtype: torch.dtype

    def out_dtype(self, m: TensorMap) -> torch.dtype:
        return torch.float32 if m.keeps_float32 else self.dtype

    def nbytes(self, m: TensorMap) -> int:
        return math.prod(m.shape) * self.out_dtype(m).itemsize


def plan_export(ckpt: str, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 10**9) -> ExportPlan:
    path = checkpoint_iteration_dir(ckpt)
    config = _config_from_common(read_common(path))
    gpt = gpt_args(config)
    family = family_of_config(config)
    hf = hf_config(config, gpt, family)
    hf["torch_dtype"] = _HF_DTYPE_NAMES[dtype]
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is a broken checkpoint
        raise ConversionError(f"{path}: cannot read the checkpoint's metadata ({err})") from None
    maps = tensor_maps(gpt, family, _half_split_rope(family))
    for m in maps:
        md = stored.get(m.fqn)
        if md is None and not m.zeros_if_absent:
            raise ConversionError(f"{path}: tensor {m.fqn} is missing (common.json's config describes a model that has it)")
        if md is not None and tuple(md.size) != m.global_shape:
            raise ConversionError(f"{path}: tensor {m.fqn} is {list(md.size)} there, {list(m.global_shape)} "
                                  "from common.json's config")
    plan = ExportPlan(family, hf, gpt, path, [], stored, dtype)
    plan.shards = pack_by_size(maps, plan.nbytes, max_shard_bytes)
    return plan


def _read_shard(plan: ExportPlan, maps: list[TensorMap]) -> dict[str, torch.Tensor]:
    """The HF tensors of one output shard: one box per megamoe tensor, covering its maps."""
    boxes: dict[str, list] = {}
    for m in maps:
        if m.fqn not in plan.stored:
            continue
        lo, hi = boxes.get(m.fqn, (list(m.offsets), [o + b for o, b in zip(m.offsets, m.box)]))
        boxes[m.fqn] = ([min(a, o) for a, o in zip(lo, m.offsets)],
                        [max(z, o + b) for z, o, b in zip(hi, m.offsets, m.box)])
    pieces = {fqn: Piece(fqn, tuple(plan.stored[fqn].size), tuple(lo), tuple(z - a for a, z in zip(lo, hi)),
                         torch.empty([z - a for a, z in zip(lo, hi)], dtype=plan.stored[fqn].properties.dtype))
              for fqn, (lo, hi) in boxes.items()}
    ordered = list(pieces.values())
    if ordered:
        dcp.load({str(i): p.view for i, p in enumerate(ordered)}, storage_reader=dcp.FileSystemReader(plan.path),
                 planner=PieceLoadPlanner(ordered), no_dist=True)
    out = {}
    for m in maps:
        if m.fqn not in pieces:  # zeros_if_absent
            out[m.hf] = torch.zeros(m.shape, dtype=plan.out_dtype(m))
            continue
        p = pieces[m.fqn]
        view = p.view[tuple(slice(o - a, o - a + b) for o, a, b in zip(m.offsets, p.offsets, m.box))]
        out[m.hf] = to_half_split(view.reshape(m.shape), m.rope).to(plan.out_dtype(m)).clone()
    return out


def export_hf(ckpt: str, out: str, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 10**9,
              workers: int = 4, tokenizer: Optional[str] = None, quiet: bool = False) -> str:
    """Convert the megamoe checkpoint ``ckpt`` (its root or one iteration's directory) into the
    HF directory ``out``."""
    plan = plan_export(ckpt, dtype, max_shard_bytes)
    tmp = _start_output(out)
    files = shard_names(len(plan.shards))
    total = sum(plan.nbytes(m) for shard in plan.shards for m in shard)
    progress = Progress(total, "export", quiet=quiet)

    def write(i: int) -> list[str]:
        tensors = _read_shard(plan, plan.shards[i])
        write_shard(os.path.join(tmp, files[i]), tensors)
        progress.advance(sum(plan.nbytes(m) for m in plan.shards[i]))
        return list(tensors)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            names = list(pool.map(write, range(len(plan.shards))))
        progress.close()
        write_index(tmp, zip(files, names), total)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plan.hf_config, f, indent=2)
        if tokenizer is not None and not _copy_tokenizer(tokenizer, tmp):
            raise ConversionError(f"--tokenizer {tokenizer}: none of {', '.join(TOKENIZER_FILES)} there")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)
    return out


def export_memory_bytes(plan: ExportPlan, workers: int) -> int:
    """Peak bytes of the export: per worker, an output shard (read box and converted copy)
    and the largest stored piece (DCP reads a whole stored piece to cut a box from it)."""
    largest = max(sum(plan.nbytes(m) for m in shard) for shard in plan.shards)
    stored = max(math.prod(c.sizes) * md.properties.dtype.itemsize
                 for md in plan.stored.values() if hasattr(md, "chunks") for c in md.chunks)
    return PROCESS_BASE_BYTES + min(workers, len(plan.shards)) * (2 * largest + stored)
