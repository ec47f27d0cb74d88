"""Checkpoints: every rank writes its own pieces of the global tensors with
``torch.distributed.checkpoint`` (DCP), so a checkpoint loads into any layout.

Layout on disk (Megatron-LM's)::

    DIR/latest_checkpointed_iteration.txt     the last complete checkpoint's iteration
    DIR/iter_0000100/                         DCP: .metadata plus one file per writing rank
    DIR/iter_0000100/common.json              iteration, consumed samples, optimizer step, loss scale, layout, config
    DIR/iter_0000100/rng/rank_00003.pt        each rank's RNG states (Python, numpy, torch, CUDA, TP/EP streams)

Tensors are named by their global name (``model/layers.3.ffn.experts.w13``,
``optim/exp_avg/layers.3.ffn.experts.w13``, ...) and stored as pieces of the global, unpadded
tensor at their offsets (:mod:`megamoe.parallel.param_spec`): the single-process model's
tensors, whatever TP, PP, EP, expert-TP, DP, CP, optimizer sharding or expert backend wrote
them. One rank writes each piece (its owner). The distributed optimizer's flat shards are
cut into boxes of the global tensors on the way (a flat range of a row-major tensor is a few
boxes), so its states reshard like everything else.

Saves are atomic: ranks write into ``iter_N.tmp``; after all of them finished, rank 0 renames
it to ``iter_N`` and only then rewrites the tracker file (itself by rename). A job killed
mid-save leaves the previous checkpoint as the one ``--load`` finds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megamoe.config import Config, ConfigError
from megamoe.parallel.param_spec import ParamSpec, global_name, spec_of
from megamoe.parallel.random import RNGStatesTracker
from megamoe.parallel.state import ParallelState
from megamoe.training.snapshot import Snapshot

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
# threads that write one rank's files (DCP splits a rank's tensors over them by size); one
# thread leaves a synchronous save of GPU tensors waiting on each device-to-host copy in turn
WRITER_THREADS = 4


class CheckedFileSystemWriter(dcp.FileSystemWriter):
    """DCP's file writer, failing when a piece was not written. Its extra writer threads drop
    their exceptions (a full disk, a failed read of the data): the save would then complete
    with metadata naming pieces that no file holds."""

    def write_data(self, plan, planner):
        return self._checked(plan, super().write_data(plan, planner))

    def _checked(self, plan, done):
        written = len(done.value())
        if written != len(plan.items):
            raise OSError(f"{len(plan.items) - written} of {len(plan.items)} pieces were not written to {self.path} "
                          "(a writer thread failed; its error is printed above)")
        return done


def _writer(path: str) -> dcp.FileSystemWriter:
    return CheckedFileSystemWriter(path, thread_count=WRITER_THREADS)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker file names, or None when ``root`` holds no checkpoint yet."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ConfigError(f"--load {root}: {TRACKER} holds {text!r}, not an iteration number")
    return int(text)


def remove_old_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the latest ``keep`` complete iteration directories (never the tracker's);
    returns the removed paths."""
    latest = latest_iteration(root)
    found = sorted(int(name[5:]) for name in os.listdir(root)
                   if name.startswith("iter_") and name[5:].isdigit() and len(name) == 12)
    old = [it for it in found[:-keep] if it != latest]
    for it in old:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
    return [iteration_dir(root, it) for it in old]


# ---------------------------------------------------------------------------------------------
# pieces of global tensors


@dataclass
class Piece:
    """``view`` (a view into this rank's tensor) is ``global[offsets : offsets + sizes]`` of the
    global tensor ``fqn`` of shape ``shape``."""

    fqn: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    view: torch.Tensor


def _flat_boxes(shape: tuple[int, ...], lo: int, hi: int) -> Iterator[tuple[int, tuple, tuple]]:
    """The flat range ``[lo, hi)`` of a row-major tensor of ``shape`` as boxes, each contiguous
    in memory: (flat start, start per dim, size per dim)."""
    if lo >= hi:
        return
    if not shape:
        yield lo, (), ()
        return
    row = math.prod(shape[1:])
    if lo % row:  # a partial first row
        r = lo // row
        end = min(hi, (r + 1) * row)
        for flat, start, size in _flat_boxes(shape[1:], lo - r * row, end - r * row):
            yield r * row + flat, (r, *start), (1, *size)
        lo = end
    full = (hi - lo) // row
    if full:
        yield lo, (lo // row, *(0 for _ in shape[1:])), (full, *shape[1:])
        lo += full * row
    if lo < hi:  # a partial last row
        r = lo // row
        for flat, start, size in _flat_boxes(shape[1:], 0, hi - lo):
            yield r * row + flat, (r, *start), (1, *size)


def global_pieces(fqn: str, flat: torch.Tensor, lo: int, local_shape: tuple[int, ...], spec: ParamSpec,
                  state: ParallelState) -> list[Piece]:
    """Pieces of global tensor ``fqn`` held by ``flat``: elements ``[lo, lo + flat.numel())`` of
    this rank's tensor of ``local_shape`` (the whole tensor, flattened, or a distributed
    optimizer's shard of it)."""
    pieces = []
    for flat_start, start, size in _flat_boxes(local_shape, lo, lo + flat.numel()):
        n = math.prod(size)
        block = flat[flat_start - lo: flat_start - lo + n].view(size)
        for box in spec.boxes(state):
            ranges = []
            for d, (s, b0, bn) in enumerate(zip(box.slices, start, size)):
                s0 = 0 if s.start is None else s.start
                s1 = local_shape[d] if s.stop is None else s.stop
                a, z = max(b0, s0), min(b0 + bn, s1)
                if a >= z:
                    break
                ranges.append((a - b0, z - b0, a - s0))
            else:
                view = block[tuple(slice(a, z) for a, z, _ in ranges)]
                for _ in spec.index:
                    view = view.unsqueeze(0)
                k = len(spec.index)
                offsets = (*box.offsets[:k], *(box.offsets[k + d] + r[2] for d, r in enumerate(ranges)))
                pieces.append(Piece(fqn, spec.shape, offsets, tuple(view.shape), view))
    return pieces


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, ParamSpec]]:
    """(global name, tensor, spec) of every parameter and persistent buffer."""
    for name, p in model.named_parameters():
        spec = spec_of(p)
        yield global_name(name, spec), p, spec
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in _non_persistent(model, name):
            continue
        yield name, b, spec_of(b)


def _non_persistent(model: torch.nn.Module, name: str) -> set:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner._non_persistent_buffers_set


def model_pieces(model: torch.nn.Module, state: ParallelState, owned_only: bool = False) -> list[Piece]:
    """This rank's pieces of the weights and buffers (``owned_only``: those it writes)."""
    pieces = []
    for name, t, spec in _named_tensors(model):
        if not owned_only or spec.is_owner(state):
            pieces += global_pieces("model/" + name, t.detach().view(-1), 0, tuple(t.shape), spec, state)
    return pieces


def optimizer_pieces(model: torch.nn.Module, optimizer, state: ParallelState, owned_only: bool = False) -> list[Piece]:
    """This rank's pieces of the float32 masters (when they are not the parameters) and Adam's
    moments (``owned_only``: those it writes)."""
    names = {p: global_name(name, spec_of(p)) for name, p in model.named_parameters()}
    pieces = []
    for p, lo, tensors in optimizer.state_pieces():
        spec = spec_of(p)
        if owned_only and not _owns_optimizer_state(spec, state, optimizer.dp_sharded):
            continue
        for kind, t in tensors.items():
            pieces += global_pieces(f"optim/{kind}/{names[p]}", t.view(-1), lo, tuple(p.shape), spec, state)
    return pieces


# ---------------------------------------------------------------------------------------------
# DCP planners over pieces


def _key(piece: Piece) -> str:
    return f"{piece.fqn}@{','.join(map(str, piece.offsets))}"


class _PieceSavePlanner(DefaultSavePlanner):
    """Writes each piece as a shard of its global tensor."""

    def __init__(self, pieces: list[Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = {_key(p): p for p in pieces}

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, p in self.pieces.items():
            tensor = self.state_dict[key]
            items.append(WriteItem(
                index=MetadataIndex(p.fqn, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.sizes)),
                                            properties=TensorProperties.create_from_tensor(tensor),
                                            size=torch.Size(p.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        fqn, offsets = write_item.index.fqn, tuple(write_item.index.offset)
        return self.state_dict[f"{fqn}@{','.join(map(str, offsets))}"]


class PieceLoadPlanner(DefaultLoadPlanner):
    """Reads each piece from whichever saved shards overlap it."""

    def __init__(self, pieces: list[Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = pieces

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, p in enumerate(self.pieces):
            md = self.metadata.state_dict_metadata[p.fqn]
            reads = create_read_items_for_chunk_list(
                p.fqn, md, [ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.sizes))])
            # destinations by piece number: two pieces may read the same stored tensor (a master
            # loaded from the model weights of a run whose parameters were their own masters)
            items += [dataclasses.replace(r, dest_index=MetadataIndex(str(i), r.dest_index.offset)) for r in reads]
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[int(index.fqn)].view


# ---------------------------------------------------------------------------------------------
# RNG


def rng_states(tracker: Optional[RNGStatesTracker], device: torch.device) -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if tracker is not None:
        states["streams"] = {k: v.cpu() for k, v in tracker.state_dict().items()}
    return states


def restore_rng_states(states: dict, tracker: Optional[RNGStatesTracker], device: torch.device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    if tracker is not None and "streams" in states:
        tracker.load_state_dict(states["streams"])


# ---------------------------------------------------------------------------------------------
# save / load


def _distributed(state: ParallelState) -> bool:
    return dist.is_initialized() and state.layout.world_size > 1


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every save and load of one process that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(state: ParallelState) -> None:
    if _distributed(state):
        dist.barrier()


def _all_ok(ok: bool, state: ParallelState, device: torch.device) -> bool:
    """Whether every rank reports ``ok`` (a save is recorded only when all ranks succeeded)."""
    if not (dist.is_initialized() and state.layout.world_size > 1):
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def layout_signature(config: Config, state: ParallelState) -> dict:
    p = config.parallel
    signature = {"world_size": state.layout.world_size, **p.degrees(),
                 "first_stage_layers": p.decoder_first_pipeline_num_layers,
                 "last_stage_layers": p.decoder_last_pipeline_num_layers}
    if p.pipeline_schedule != "1f1b":  # another placement of the layers (1F1B's keeps older signatures)
        signature["pipeline_schedule"] = p.pipeline_schedule
    if p.pipeline_model_parallel_layout is not None:
        signature["pipeline_layout"] = p.pipeline_model_parallel_layout
    return signature


def write_common(path: str, iteration: int, consumed_samples: int, optimizer_step: int, layout: dict,
                 loss_scaler: Optional[dict], config: Config, optimizer_saved: bool = True) -> None:
    """``path/common.json``: what a checkpoint holds besides its tensors (see the module
    docstring); the one writer of the format, for training saves and imported checkpoints.
    ``optimizer_saved``: False for a ``--no-save-optim`` save (the model's tensors only)."""
    common = {"format": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
              "optimizer_step": optimizer_step, "layout": layout, "loss_scaler": loss_scaler,
              "optimizer_saved": optimizer_saved, "config": dataclasses.asdict(config)}
    with open(os.path.join(path, "common.json"), "w") as f:
        json.dump(common, f, indent=1, default=str)


def _begin_save(root: str, iteration: int, model, optimizer, state: ParallelState, config: Config,
                consumed_samples: int, tracker: Optional[RNGStatesTracker], device: torch.device):
    """Make ``iter_N.tmp`` and write the small files; returns it and the pieces this rank writes."""
    tmp = iteration_dir(root, iteration) + ".tmp"
    if state.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier(state)
    torch.save(rng_states(tracker, device), os.path.join(tmp, "rng", f"rank_{state.rank:05d}.pt"))
    with_optimizer = not config.checkpoint.no_save_optim
    if state.rank == 0:
        write_common(tmp, iteration, consumed_samples, optimizer.step_count(), layout_signature(config, state),
                     optimizer.loss_scaler.state_dict() if optimizer.loss_scaler else None, config, with_optimizer)
    owned = model_pieces(model, state, owned_only=True)
    if with_optimizer:
        owned += optimizer_pieces(model, optimizer, state, owned_only=True)
    return tmp, owned


def _finish_save(root: str, iteration: int, tmp: str, error: Optional[BaseException], state: ParallelState,
                 device: torch.device) -> str:
    """After every rank wrote: rank 0 makes ``iter_N`` visible, then points the tracker at it.
    A failure on any rank raises and records nothing."""
    if not _all_ok(error is None, state, device):
        raise RuntimeError(f"saving iteration {iteration} to {root} failed"
                           + (f" on rank {state.rank}: {first_failure(error)}" if error is not None
                              else " on another rank")
                           + "; the tracker still names the previous checkpoint")
    final = iteration_dir(root, iteration)
    if state.rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier(state)
    return final


def save_checkpoint(root: str, iteration: int, model, optimizer, state: ParallelState, config: Config,
                    consumed_samples: int, tracker: Optional[RNGStatesTracker], device: torch.device) -> str:
    """Write ``root/iter_N`` (see the module docstring); every rank calls it. Returns the directory."""
    tmp, owned = _begin_save(root, iteration, model, optimizer, state, config, consumed_samples, tracker, device)
    error = None
    try:
        with _quiet_single_process():
            dcp.save({_key(p): p.view for p in owned}, storage_writer=_writer(tmp),
                     planner=_PieceSavePlanner(owned), no_dist=not _distributed(state))
    except (OSError, CheckpointException) as err:
        error = err
    return _finish_save(root, iteration, tmp, error, state, device)


class AsyncSaver:
    """``--async-save``: the tensors are copied aside (:mod:`megamoe.training.snapshot`), then
    written by a background thread while training goes on. One save is in flight at a time;
    :meth:`poll` (after every iteration) finishes it once every rank's write has completed, the
    same way as a synchronous save; :meth:`wait` blocks for it (before the next save, at the end)."""

    def __init__(self, state: ParallelState, device: torch.device):
        self.state, self.device = state, device
        self.pending = None  # (root, iteration, tmp, future)
        self.started_at = 0.0  # perf_counter() when the save in flight (or the last one) began
        self.snapshot = Snapshot(device)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megamoe-async-save")
        self._group = None

    def _cpu_group(self):
        # the writer thread runs DCP's collectives: a separate gloo group keeps them apart from
        # the training loop's (and gives NCCL jobs a CPU backend for the host copies)
        if self._group is None and _distributed(self.state):
            self._group = dist.new_group(backend="gloo")
        return self._group

    def start(self, root: str, iteration: int, model, optimizer, config: Config, consumed_samples: int,
              tracker: Optional[RNGStatesTracker]) -> None:
        self.wait()
        self.started_at = time.perf_counter()
        state = self.state
        tmp, owned = _begin_save(root, iteration, model, optimizer, state, config, consumed_samples, tracker,
                                 self.device)
        staged = self.snapshot.take({_key(p): p.view for p in owned})
        group = self._cpu_group()

        def write() -> None:
            with _quiet_single_process():
                dcp.save(staged(), storage_writer=_writer(tmp), planner=_PieceSavePlanner(owned),
                         process_group=group, no_dist=not _distributed(state))

        self.pending = (root, iteration, tmp, self._writer.submit(write))

    def poll(self) -> Optional[str]:
        """Finish the save in flight if every rank's write is done; returns its directory then."""
        if self.pending is None or not _all_ok(self.pending[3].done(), self.state, self.device):
            return None
        return self._finish()

    def wait(self) -> Optional[str]:
        if self.pending is None:
            return None
        try:
            self.pending[3].result()
        except BaseException:  # noqa: BLE001 - reported by _finish
            pass
        return self._finish()

    def _finish(self) -> str:
        root, iteration, tmp, future = self.pending
        self.pending = None
        error = future.exception()
        return _finish_save(root, iteration, tmp, error, self.state, self.device)

    def close(self) -> None:
        """After :meth:`wait`: stop the writer thread and let the host buffers go."""
        self._writer.shutdown(wait=True)
        self.snapshot.close()


def _owns_optimizer_state(spec: ParamSpec, state: ParallelState, dp_sharded: bool) -> bool:
    """Whether this rank writes its optimizer states of a parameter. With the distributed
    optimizer each data-parallel rank holds a different shard of them and writes its own (it
    need only be rank 0 of the other replica groups)."""
    if not dp_sharded:
        return spec.is_owner(state)
    if spec.shared_embedding and not state.is_first_stage:
        return False
    sharded_over = ("edp",) if spec.is_expert else ("dp", "cp")
    return all(state.group(k).rank == 0 for k in spec.replica_groups() if k not in sharded_over)


@dataclass
class Loaded:
    iteration: int
    consumed_samples: int
    rng_restored: bool


def read_common(path: str) -> dict:
    try:
        with open(os.path.join(path, "common.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--load: {path} is not a complete megamoe checkpoint ({err})") from None


def _check_strictness(pieces: list[Piece], saved: dict, path: str, state: ParallelState, strictness: str) -> None:
    """``--dist-ckpt-strictness``: list the tensors the checkpoint and the model do not share, or
    refuse the unexpected ones. The model's tensors are spread over the ranks, so the unexpected
    ones are those that no rank asked for."""
    if strictness == "log_all":
        missing = sorted({p.fqn for p in pieces if p.fqn not in saved})
        if missing:
            log.warning("--load %s: missing from the checkpoint on rank %d: %s", path, state.rank, ", ".join(missing))
    if strictness not in ("log_unexpected", "log_all", "raise_unexpected", "raise_all"):
        return
    asked = {p.fqn for p in pieces}
    if _distributed(state):
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, asked)
        asked = set().union(*every)
    unexpected = sorted(k for k in saved if k.startswith("model/") and k not in asked)
    if not unexpected:
        return
    if strictness.startswith("raise"):
        raise ConfigError(f"--load: {path} holds {len(unexpected)} tensors this model does not have "
                          f"(--dist-ckpt-strictness {strictness}): {', '.join(unexpected[:5])}"
                          + (", ..." if len(unexpected) > 5 else ""))
    if state.rank == 0:
        log.warning("--load %s: tensors of the checkpoint this model does not have (ignored): %s", path,
                    ", ".join(unexpected))


def load_checkpoint(root: str, model, optimizer, state: ParallelState, config: Config,
                    tracker: Optional[RNGStatesTracker], device: torch.device, load_optim: bool = True,
                    load_rng: bool = True) -> Optional[Loaded]:
    """Load the tracker's checkpoint into this layout (every rank calls it); None when ``root``
    holds none yet. Raises ConfigError for a checkpoint of another model or a broken one."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    common = read_common(path)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is a broken checkpoint
        raise ConfigError(f"--load: cannot read {path}: {err}") from None
    saved = metadata.state_dict_metadata
    pieces = model_pieces(model, state)
    if load_optim and not common.get("optimizer_saved", True):
        raise ConfigError(f"--load: {path} was saved with --no-save-optim and holds no optimizer state: give "
                          "--no-load-optim (or --finetune) to start a fresh optimizer from its weights")
    if load_optim:
        optimizer.ensure_state()
        opt = optimizer_pieces(model, optimizer, state)
        for p in opt:  # masters saved by a run whose parameters were their own masters
            if p.fqn not in saved and p.fqn.startswith("optim/master/"):
                p.fqn = "model/" + p.fqn[len("optim/master/"):]
        if common["optimizer_step"] == 0:  # saved before the first step: no moments yet (zeros)
            opt = [p for p in opt if p.fqn in saved or not p.fqn.startswith("optim/exp_avg")]
        pieces += opt
    _check_strictness(pieces, saved, path, state, config.checkpoint.dist_ckpt_strictness)
    _check_shapes(pieces, saved, path)
    try:
        with _quiet_single_process():
            dcp.load({str(i): p.view for i, p in enumerate(pieces)}, storage_reader=dcp.FileSystemReader(path),
                     planner=PieceLoadPlanner(pieces), no_dist=not _distributed(state))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - truncated or corrupt files
        raise ConfigError(f"--load: {path} is corrupt or incomplete ({first_failure(err)})") from None
    if not load_optim:
        optimizer.reset_masters_from_params()
    else:
        optimizer.set_step_count(common["optimizer_step"])
        if optimizer.loss_scaler is not None and common.get("loss_scaler"):  # else this run's fresh scale
            optimizer.loss_scaler.load_state_dict(common["loss_scaler"])
    optimizer.sync_fp8_params()
    restored = False
    if load_rng and common["layout"] == layout_signature(config, state):
        rng_path = os.path.join(path, "rng", f"rank_{state.rank:05d}.pt")
        restore_rng_states(torch.load(rng_path, weights_only=False), tracker, device)
        restored = True
    return Loaded(common["iteration"], common["consumed_samples"], restored)


def first_failure(err: BaseException) -> str:
    """One line: the underlying error (DCP wraps each rank's, with its traceback)."""
    failures = getattr(err, "failures", None)
    if failures:
        cause = sorted(failures.items())[0][1]
        return first_failure(cause[0] if isinstance(cause, tuple) else cause)
    text = str(err).splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_shapes(pieces: list[Piece], saved: dict, path: str) -> None:
    for p in pieces:
        md = saved.get(p.fqn)
        if md is None:
            raise ConfigError(f"--load: {path} holds a different model: it has no tensor {p.fqn}")
        if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(p.shape):
            have = list(md.size) if isinstance(md, TensorStorageMetadata) else "not a tensor"
            raise ConfigError(f"--load: {path} holds a different model: {p.fqn} is {have} there, "
                              f"{list(p.shape)} here")
