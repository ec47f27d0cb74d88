"""Parallel state: degrees, rank grids and process groups of the five parallel dimensions.

Two views of the same ranks ("MoE parallel folding"):

- dense layers (attention, dense MLP, embeddings) use ``tp x cp x dp x pp``;
- expert layers use ``etp x ep x edp x pp``, with ``etp * ep * edp == tp * cp * dp``.

Ranks are numbered over the dimensions in ``order`` (default ``tp-cp-ep-dp-pp``), innermost
first: neighbouring ranks differ in the first dimension, so TP and EP stay inside a node. The
dense view drops ``ep`` from the order, the expert view drops ``cp`` and reads ``tp`` as ``etp``
and ``dp`` as ``edp``. Both views must agree on every rank's pipeline stage.

:class:`ParallelLayout` is the pure arithmetic (no processes: ``tools/parallel_layout.py``
prints it for any world size). :class:`ParallelState` adds this rank and its process groups and
is passed explicitly to everything that communicates; there are no global groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch.distributed as dist

from megamoe.config import ConfigError

DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"

_DEGREE_FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "vpp": "--virtual-pipeline-model-parallel-size",
}

# Group kinds: which view they live in and which dimensions vary inside one group.
GROUP_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "pp": ("dense", ("pp",)),
    "tp_cp": ("dense", ("tp", "cp")),
    "dp_cp": ("dense", ("cp", "dp")),
    "mp": ("dense", ("tp", "pp")),
    "tp_dp_cp": ("dense", ("tp", "cp", "dp")),
    "etp": ("expert", ("etp",)),
    "ep": ("expert", ("ep",)),
    "edp": ("expert", ("edp",)),
    "etp_ep": ("expert", ("etp", "ep")),
}
GROUP_DESCRIPTIONS = {
    "tp": "tensor parallel (attention, dense MLP, embeddings)",
    "cp": "context parallel (sequence shards)",
    "dp": "data parallel (dense)",
    "pp": "pipeline stages",
    "tp_cp": "tensor x context parallel",
    "dp_cp": "dense gradient reduction (data x context)",
    "mp": "model parallel (tensor x pipeline)",
    "tp_dp_cp": "one pipeline stage (FP8 delayed-scaling amax reduction)",
    "etp": "expert tensor parallel",
    "ep": "expert parallel (token all-to-all)",
    "edp": "expert data parallel (expert gradient reduction)",
    "etp_ep": "expert tensor x expert parallel",
    "embd": "embedding (first and last pipeline stage)",
}


@dataclass(frozen=True)
class RankGrid:
    """Ranks ``0 .. world-1`` laid out over named dimensions, innermost first."""

    dims: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    def array(self) -> np.ndarray:
        """The ranks as an array indexed outermost dimension first."""
        return np.arange(self.world_size).reshape(tuple(reversed(self.sizes)))

    def _axis(self, dim: str) -> int:
        return len(self.dims) - 1 - self.dims.index(dim)

    def groups(self, dims: tuple[str, ...]) -> list[list[int]]:
        """All groups whose members differ only in ``dims`` (members innermost-fastest)."""
        varying = sorted((self._axis(d) for d in dims))
        fixed = [a for a in range(len(self.dims)) if a not in varying]
        group_size = math.prod(self.sizes[self.dims.index(d)] for d in dims)
        ordered = self.array().transpose(fixed + varying)
        return ordered.reshape(-1, group_size).tolist()

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along every dimension."""
        index = np.unravel_index(rank, tuple(reversed(self.sizes)))
        return {d: int(index[self._axis(d)]) for d in self.dims}


def _parse_order(order: str) -> tuple[str, ...]:
    dims = tuple(order.split("-"))
    if sorted(dims) != sorted(DIMENSIONS):
        raise ConfigError(
            f"--parallel-rank-order {order}: must name each of {', '.join(DIMENSIONS)} once, "
            "separated by '-'"
        )
    return dims


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of every dimension and the two rank grids; pure arithmetic, no processes."""

    world_size: int
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int
    vpp: Optional[int]
    order: str
    dense: RankGrid = field(repr=False)
    expert: RankGrid = field(repr=False)

    @classmethod
    def build(
        cls,
        world_size: int,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        ep: int = 1,
        etp: Optional[int] = None,
        vpp: Optional[int] = None,
        order: str = DEFAULT_ORDER,
    ) -> "ParallelLayout":
        """Derive dp and edp from the world size and check the degrees fit together."""
        etp = tp if etp is None else etp
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep), ("etp", etp)):
            if value < 1:
                raise ConfigError(f"{_DEGREE_FLAGS[name]} {value}: must be at least 1")
        if vpp is not None and vpp < 1:
            raise ConfigError(f"{_DEGREE_FLAGS['vpp']} {vpp}: must be at least 1")
        if world_size < 1:
            raise ConfigError(f"world size {world_size}: must be at least 1")
        dims = _parse_order(order)
        dense_model = tp * cp * pp
        if world_size % dense_model:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} x "
                f"--pipeline-model-parallel-size {pp} = {dense_model} does not divide "
                f"the world size {world_size}"
            )
        dp = world_size // dense_model
        per_stage = world_size // pp  # == tp * cp * dp
        if per_stage % (etp * ep):
            raise ConfigError(
                f"--expert-tensor-parallel-size {etp} x --expert-model-parallel-size {ep} = "
                f"{etp * ep} does not divide tp*cp*dp = {per_stage} (world size {world_size} / "
                f"--pipeline-model-parallel-size {pp}), so tp*cp*dp != etp*ep*edp"
            )
        edp = per_stage // (etp * ep)
        dense_sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
        expert_names = {"tp": "etp", "ep": "ep", "dp": "edp", "pp": "pp"}
        expert_sizes = {"etp": etp, "ep": ep, "edp": edp, "pp": pp}
        dense = RankGrid(
            tuple(d for d in dims if d != "ep"), tuple(dense_sizes[d] for d in dims if d != "ep")
        )
        expert_dims = tuple(expert_names[d] for d in dims if d != "cp")
        expert = RankGrid(expert_dims, tuple(expert_sizes[d] for d in expert_dims))
        layout = cls(world_size, tp, cp, dp, pp, etp, ep, edp, vpp, order, dense, expert)
        layout._check_stages_agree()
        return layout

    def _check_stages_agree(self) -> None:
        for rank in range(self.world_size):
            if self.dense.coords(rank)["pp"] != self.expert.coords(rank)["pp"]:
                raise ConfigError(
                    f"--parallel-rank-order {self.order}: rank {rank} would sit on pipeline stage "
                    f"{self.dense.coords(rank)['pp']} for dense layers but "
                    f"{self.expert.coords(rank)['pp']} for experts; put pp outside tp, cp, ep and dp "
                    "or make tp*cp equal etp*ep below it"
                )

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind (see GROUP_KINDS, plus 'embd'), as lists of global ranks."""
        if kind == "embd":
            # First and last pipeline stage of each pipeline group (one rank when pp == 1).
            return [sorted({g[0], g[-1]}) for g in self.dense.groups(("pp",))]
        view, dims = GROUP_KINDS[kind]
        return (self.dense if view == "dense" else self.expert).groups(dims)

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of a rank in both views: tp, cp, dp, pp, etp, ep, edp."""
        return {**self.dense.coords(rank), **self.expert.coords(rank)}

    def summary(self) -> str:
        return (
            f"world {self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp} x pp {self.pp}"
            f" (dense) = etp {self.etp} x ep {self.ep} x edp {self.edp} x pp {self.pp} (experts);"
            f" rank order {self.order} (innermost first)"
            + (f"; {self.vpp} virtual stages per pipeline rank" if self.vpp else "")
        )

    def topology(self, gpus_per_node: int) -> str:
        """Nodes x GPUs per node, and which groups stay inside a node and which cross nodes
        (node = rank // gpus_per_node: torchrun and SLURM give each node consecutive ranks)."""
        if gpus_per_node < 1 or self.world_size % gpus_per_node:
            return (f"topology: {self.world_size} ranks do not fill nodes of {gpus_per_node} evenly; "
                    "groups cannot be placed on nodes")
        inside, across = [], []
        for kind in ("tp", "cp", "etp", "ep", "dp", "edp", "pp"):
            groups = self.groups(kind)
            if len(groups[0]) == 1:
                continue
            nodes = max(len({rank // gpus_per_node for rank in g}) for g in groups)
            if nodes == 1:
                inside.append(f"{kind} {len(groups[0])}")
            else:
                across.append(f"{kind} {len(groups[0])} over {nodes} nodes")
        return (f"topology: {self.world_size // gpus_per_node} node(s) x {gpus_per_node} GPUs; inside a node: "
                f"{', '.join(inside) or 'nothing'}; across nodes: {', '.join(across) or 'nothing'}")

    def describe(self, max_groups: Optional[int] = 4) -> str:
        """A table of every group kind: size, count and (the first few) groups."""
        lines = [self.summary(), f"{'group':<7}{'size':>5}{'count':>7}  members"]
        for kind in (*GROUP_KINDS, "embd"):
            groups = self.groups(kind)
            shown = groups if max_groups is None else groups[:max_groups]
            members = " ".join(_fmt_group(g) for g in shown)
            if len(shown) < len(groups):
                members += f" ... ({len(groups) - len(shown)} more)"
            lines.append(f"{kind:<7}{len(groups[0]):>5}{len(groups):>7}  {members}")
        return "\n".join(lines)


def _fmt_group(ranks: list[int]) -> str:
    return "[" + ",".join(map(str, ranks)) + "]"


@dataclass(frozen=True)
class Group:
    """One process group as seen from this rank: its members and this rank's place in it.

    ``process_group`` is None only when torch.distributed is not initialised (a single
    process); collectives in :mod:`megamoe.parallel.mappings` short-circuit groups of size 1.
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    process_group: Optional[dist.ProcessGroup] = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return len(self.ranks)


# Process groups of the current job, by member ranks. dist.new_group is collective over the
# world and every gloo/NCCL group keeps its own threads and connections until the job ends, so
# a process that builds many states (tests, benchmarks sweeping layouts) reuses the group of an
# identical rank set instead of creating another: 40 states of a 4-rank gloo job kept 456
# threads per rank busy polling, about 14% of a core each while idle. Every rank requests the
# same rank sets in the same order, so all ranks hit or miss together. The cache belongs to
# one world group (held, so its identity cannot be reused); a re-initialised job starts empty.
_PROCESS_GROUPS: dict = {"world": None, "groups": {}}


def _process_group(ranks: tuple[int, ...]) -> dist.ProcessGroup:
    if _PROCESS_GROUPS["world"] is not dist.group.WORLD:
        _PROCESS_GROUPS.update(world=dist.group.WORLD, groups={})
    groups = _PROCESS_GROUPS["groups"]
    if ranks not in groups:
        groups[ranks] = dist.new_group(list(ranks))
    return groups[ranks]


class ParallelState:
    """This rank's place in the layout, with one process group per kind.

    Build it once with :meth:`build` (collective: every rank calls it with the same degrees)
    and pass it to every module and function that communicates. Attributes ``tp``, ``cp``,
    ``dp``, ``pp``, ``tp_cp``, ``dp_cp``, ``mp``, ``tp_dp_cp``, ``etp``, ``ep``, ``edp``, ``etp_ep`` and
    ``embd`` are :class:`Group` objects (``embd`` is None on middle pipeline stages).
    """

    def __init__(self, layout: ParallelLayout, rank: int, groups: dict[str, Optional[Group]]):
        self.layout = layout
        self.rank = rank
        self.coords = layout.coords(rank)
        self._groups = groups
        for kind, group in groups.items():
            setattr(self, kind, group)

    tp: Group
    cp: Group
    dp: Group
    pp: Group
    tp_cp: Group
    dp_cp: Group
    mp: Group
    tp_dp_cp: Group
    etp: Group
    ep: Group
    edp: Group
    etp_ep: Group
    embd: Optional[Group]

    @classmethod
    def without_process_groups(cls, layout: ParallelLayout, rank: int) -> "ParallelState":
        """``rank``'s groups in ``layout`` with no process groups behind them: for planning and
        layout tests, never for collectives."""
        groups = {}
        for kind in (*GROUP_KINDS, "embd"):
            mine = [g for g in layout.groups(kind) if rank in g]
            groups[kind] = Group(kind, tuple(mine[0]), mine[0].index(rank)) if mine else None
        return cls(layout, rank, groups)

    @classmethod
    def build(
        cls,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        ep: int = 1,
        etp: Optional[int] = None,
        vpp: Optional[int] = None,
        order: str = DEFAULT_ORDER,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> "ParallelState":
        """Build the layout and create every process group (all ranks must call this).

        Without an initialised process group, only a world of one rank is allowed.
        """
        initialized = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if not initialized and world_size != 1:
            raise RuntimeError("ParallelState.build: torch.distributed is not initialised")
        initialized = initialized and world_size > 1  # a world of one needs no process groups
        layout = ParallelLayout.build(world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, order=order)
        groups: dict[str, Optional[Group]] = {}
        for kind in (*GROUP_KINDS, "embd"):
            partition = tuple(tuple(g) for g in layout.groups(kind))
            if initialized:
                for members in partition:
                    _process_group(members)  # collective: every rank creates every group
            mine = [g for g in partition if rank in g]
            if not mine:
                groups[kind] = None
                continue
            members = mine[0]
            handle = _process_group(members) if initialized else None
            groups[kind] = Group(kind, members, members.index(rank), handle)
        return cls(layout, rank, groups)

    @classmethod
    def single(cls) -> "ParallelState":
        """The state of a lone process, every degree 1 (usable inside a distributed job too,
        e.g. to build a single-process reference model)."""
        return cls.build(world_size=1, rank=0)

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def group(self, kind: str) -> Optional[Group]:
        return self._groups[kind]

    def describe(self) -> str:
        """This rank's coordinates and the members of each of its groups."""
        coords = " ".join(f"{k}={v}" for k, v in self.coords.items())
        lines = [self.layout.summary(), f"rank {self.rank}: {coords}"]
        for kind, group in self._groups.items():
            members = "-" if group is None else _fmt_group(list(group.ranks))
            lines.append(f"  {kind:<7}{members}")
        return "\n".join(lines)
