"""One description per parameter: its global tensor, how this rank's tensor is cut from it, its
role and the groups that reduce its gradient.

Every parameter carries a :class:`ParamSpec` (``param.spec``, set by the layer that creates it;
:func:`spec_of` gives parameters without one, e.g. in toy test models, the spec of a
replicated dense weight). The gradient buckets, the grad norm, the optimizers, the checkpoints
and the parity tests read it; nothing else describes a parameter's layout.

The global tensor is the one the single-process model holds, without padding: the embedding
and the output head have the real vocabulary's rows (the padded rows of the last TP rank are
not part of it). A :class:`Split` cuts one global dimension over a group of the parallel
state, contiguously; with ``parts = 2`` the dimension holds two equal pieces (the fused gate
and up projections of ``w13``), each cut over the group on its own, so every rank holds its
slice of both. ``index`` places a tensor that is one slice of a larger global tensor (one TE
expert weight is one expert of ``w13``); ``rename`` maps its module path onto the global
tensor's name, so every expert backend reads and writes the same tensors.

:meth:`ParamSpec.boxes` gives this rank's pieces of the global tensor (a local view, its
global offsets and sizes): one per part, none for padding. A parameter held by several ranks
(replicated over DP, or over TP when it is not split there) is *owned* by one of them,
:meth:`ParamSpec.is_owner`: the one with rank 0 in every group it is replicated over, on the
first pipeline stage for the two copies of a shared embedding.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from megamoe.parallel.state import Group, ParallelState

Role = Literal["embedding", "head", "linear", "bias", "norm", "router", "expert"]


@dataclass(frozen=True)
class Split:
    """Global dimension ``dim`` cut contiguously over group ``group`` (a ParallelState group
    kind): ``parts`` equal pieces, each cut on its own. ``padded``: the size the cut divides
    when it is larger than the global dimension (the padded vocabulary)."""

    dim: int
    group: str
    parts: int = 1
    padded: Optional[int] = None


@dataclass(frozen=True)
class Box:
    """One piece of the global tensor that this rank holds: ``local[slices]`` (with a leading
    size-1 dimension per ``index`` entry) is ``global[offsets : offsets + sizes]``."""

    slices: tuple[slice, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class ParamSpec:
    """See the module docstring. ``grad_partial_over_tp``: replicated over TP but fed by
    sequence-sharded activations, so each TP rank's gradient is a partial sum (summed over TP
    before the DP reduction). ``shared_embedding``: this is one of the two pipeline copies of the
    embedding (first and last stage), whose gradients are summed over the ``embd`` group."""

    role: Role
    shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    index: tuple[int, ...] = ()
    rename: Optional[tuple[str, str]] = None
    grad_partial_over_tp: bool = False
    shared_embedding: bool = False
    _by_dim: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_dim", {s.dim: s for s in self.splits})

    @property
    def is_expert(self) -> bool:
        return self.role == "expert"

    def split_at(self, dim: int) -> Optional[Split]:
        """The split of global dimension ``dim``, if it is cut."""
        return self._by_dim.get(dim)

    def split_over(self, group: str) -> bool:
        return any(s.group == group for s in self.splits)

    def with_(self, **changes) -> "ParamSpec":
        return dataclasses.replace(self, **changes)  # __post_init__ rebuilds the split index

    # -- where this rank's tensor sits in the global one

    def local_shape(self, state: ParallelState) -> tuple[int, ...]:
        shape = []
        for d in range(len(self.index), len(self.shape)):
            s = self._by_dim.get(d)
            if s is None:
                shape.append(self.shape[d])
            else:
                full = s.padded or self.shape[d]
                shape.append(full // state.group(s.group).size)
        return tuple(shape)

    def boxes(self, state: ParallelState) -> list[Box]:
        """This rank's pieces of the global tensor (padding left out)."""
        per_dim = []  # for each local dim: [(local slice, global offset, size)]
        for d in range(len(self.index), len(self.shape)):
            s = self._by_dim.get(d)
            if s is None:
                per_dim.append([(slice(None), 0, self.shape[d])])
                continue
            group = state.group(s.group)
            piece = (s.padded or self.shape[d]) // s.parts  # global size of one part
            local_piece = piece // group.size
            pieces = []
            for j in range(s.parts):
                start = j * piece + group.rank * local_piece
                size = max(0, min(local_piece, self.shape[d] - start))
                if size:
                    pieces.append((slice(j * local_piece, j * local_piece + size), start, size))
            per_dim.append(pieces)
        boxes = []
        for combo in itertools.product(*per_dim):
            boxes.append(Box(tuple(c[0] for c in combo), (*self.index, *(c[1] for c in combo)),
                             (*(1 for _ in self.index), *(c[2] for c in combo))))
        return boxes

    def box_view(self, local: torch.Tensor, box: Box) -> torch.Tensor:
        """``local[box]`` shaped like the global piece (size-1 dims for ``index``)."""
        view = local[box.slices]
        for _ in self.index:
            view = view.unsqueeze(0)
        return view

    # -- who holds copies, who reduces the gradient

    def replica_groups(self) -> tuple[str, ...]:
        """Group kinds over which every rank holds the same tensor."""
        if self.is_expert:
            return ("edp",) + (() if self.split_over("etp") else ("etp",))
        return ("dp", "cp") + (() if self.split_over("tp") else ("tp",))

    def stage_groups(self) -> tuple[str, ...]:
        """Group kinds that together span this pipeline stage's ranks, in this parameter's view."""
        return ("etp", "ep", "edp") if self.is_expert else ("tp", "dp", "cp")

    def is_owner(self, state: ParallelState, within_stage: bool = False) -> bool:
        """Whether this rank writes the tensor (one holder of each piece; see the module
        docstring). ``within_stage``: the owner among this stage's ranks (either copy of a
        shared embedding)."""
        if self.shared_embedding and not state.is_first_stage and not within_stage:
            return False
        return all(state.group(kind).rank == 0 for kind in self.replica_groups())

    def grad_groups(self, state: ParallelState) -> tuple[str, Group, Optional[Group]]:
        """(buffer name, the group that sums the gradient, a group summed over first)."""
        if self.is_expert:
            return "expert", state.edp, None
        if self.grad_partial_over_tp and state.tp.size > 1:
            return "dense_tp", state.dp_cp, state.tp
        if self.shared_embedding and state.embd is not None and state.embd.size > 1:
            return "dense_embd", state.dp_cp, state.embd
        return "dense", state.dp_cp, None


def set_spec(param: torch.nn.Parameter, spec: ParamSpec) -> torch.nn.Parameter:
    param.spec = spec
    return param


def spec_of(param: torch.Tensor) -> ParamSpec:
    """The parameter's spec; a replicated dense weight's for a parameter without one."""
    spec = getattr(param, "spec", None)
    return spec if spec is not None else ParamSpec("linear", tuple(param.shape))


def global_name(name: str, spec: ParamSpec) -> str:
    """The global tensor's name for the parameter at module path ``name``."""
    if spec.rename is None:
        return name
    local, target = spec.rename
    if not name.endswith(local):
        raise ValueError(f"parameter {name} does not end with {local}, its spec's local name")
    return name[: len(name) - len(local)] + target


def assemble_global(local: torch.Tensor, spec: ParamSpec, state: ParallelState) -> torch.Tensor:
    """The global tensor (of a parameter, or of anything shaped like it: its gradient) from the
    pieces of this pipeline stage's ranks, which all call this and all get it. The tests use it
    to compare any layout with the single-process model."""
    from megamoe.parallel import mappings

    full = owned_part(local, spec, state)
    for kind in spec.stage_groups():  # each element has exactly one owner: the sums are exact
        mappings.all_reduce_(full, state.group(kind))
    return full


def owned_part(local: torch.Tensor, spec: ParamSpec, state: ParallelState) -> torch.Tensor:
    """A global-shaped tensor holding this rank's pieces where it owns them and zeros elsewhere:
    summed over the spec's stage groups, it is the global tensor (:func:`assemble_global`)."""
    full = torch.zeros(spec.shape, dtype=local.dtype, device=local.device)
    if spec.is_owner(state, within_stage=True):
        for box in spec.boxes(state):
            region = full[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))]
            region.copy_(spec.box_view(local, box))
    return full
