"""Rank grids and process groups of ParallelState.

Pure-logic tier: the grids are compared with an independent reference that computes every
rank's coordinates with integer strides and groups ranks by equal coordinates, over many world
sizes, degrees and rank orders. Multi-rank tier: the process groups built on gloo contain the
ranks the layout says, and a collective over each sums exactly its members.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from megamoe.config import ConfigError
from megamoe.parallel.state import GROUP_KINDS, ParallelLayout, ParallelState

ORDERS = ["tp-cp-ep-dp-pp", "tp-ep-cp-dp-pp", "tp-cp-dp-ep-pp", "ep-tp-cp-dp-pp", "tp-pp-cp-ep-dp"]


def reference_coords(rank: int, order: str, sizes: dict[str, int]) -> dict[str, int]:
    """Coordinates by explicit strides: the first dimension in ``order`` varies fastest."""
    coords, stride = {}, 1
    for dim in order:
        coords[dim] = (rank // stride) % sizes[dim]
        stride *= sizes[dim]
    return coords


def reference_groups(world: int, order: list[str], sizes: dict[str, int], varying: set[str]) -> list[list[int]]:
    """Ranks grouped by equal coordinates outside ``varying``, each sorted by group index."""
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for rank in range(world):
        c = reference_coords(rank, order, sizes)
        key = tuple(c[d] for d in order if d not in varying)
        index, stride = 0, 1
        for d in order:  # index inside the group: innermost varying dimension fastest
            if d in varying:
                index += c[d] * stride
                stride *= sizes[d]
        buckets.setdefault(key, []).append((index, rank))
    return sorted([r for _, r in sorted(members)] for members in buckets.values())


def layouts():
    for world in (1, 2, 4, 6, 8, 12, 16, 24, 32):
        for tp, cp, pp, ep, etp in itertools.product((1, 2, 3, 4), (1, 2), (1, 2, 4), (1, 2, 4, 8), (None, 1, 2)):
            for order in ORDERS:
                try:
                    yield ParallelLayout.build(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
                except ConfigError:
                    continue


def test_grids_match_stride_reference():
    checked = 0
    for layout in layouts():
        dims = layout.order.split("-")
        dense_order = [d for d in dims if d != "ep"]
        expert_order = [{"tp": "etp", "dp": "edp"}.get(d, d) for d in dims if d != "cp"]
        dense_sizes = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp}
        expert_sizes = {"etp": layout.etp, "ep": layout.ep, "edp": layout.edp, "pp": layout.pp}
        assert layout.tp * layout.cp * layout.dp == layout.etp * layout.ep * layout.edp
        assert math.prod(dense_sizes.values()) == layout.world_size
        for kind, (view, varying) in GROUP_KINDS.items():
            order, sizes = (dense_order, dense_sizes) if view == "dense" else (expert_order, expert_sizes)
            expected = reference_groups(layout.world_size, order, sizes, set(varying))
            got = layout.groups(kind)
            assert sorted(got) == expected, (layout, kind)
            # every rank in exactly one group, and groups of the product of the varying sizes
            flat = sorted(r for g in got for r in g)
            assert flat == list(range(layout.world_size)), (layout, kind)
            assert all(len(g) == math.prod(sizes[d] for d in varying) for g in got)
        for rank in range(layout.world_size):
            c = layout.coords(rank)
            assert {k: c[k] for k in dense_sizes} == reference_coords(rank, dense_order, dense_sizes)
            assert {k: c[k] for k in expert_sizes} == reference_coords(rank, expert_order, expert_sizes)
        checked += 1
    assert checked > 300  # the sweep really covered many layouts


def test_group_member_order_follows_coordinate():
    layout = ParallelLayout.build(16, tp=2, cp=2, pp=2)
    for kind in ("tp", "cp", "dp", "pp"):
        for group in layout.groups(kind):
            assert [layout.coords(r)[kind] for r in group] == list(range(len(group)))


def test_megatron_documented_example():
    # Megatron-LM's docstring example: 16 GPUs, TP=2, PP=4 -> DP=2.
    layout = ParallelLayout.build(16, tp=2, pp=4)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert layout.groups("pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layout.groups("embd") == [[0, 12], [1, 13], [2, 14], [3, 15]]


def test_folding_tp2_attention_ep8_experts():
    # 8 ranks: attention TP=2 (DP=4), experts EP=8 with no expert TP.
    layout = ParallelLayout.build(8, tp=2, ep=8, etp=1)
    assert (layout.dp, layout.edp) == (4, 1)
    assert layout.groups("ep") == [list(range(8))]
    assert layout.groups("edp") == [[r] for r in range(8)]
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_embedding_group_is_first_and_last_stage():
    layout = ParallelLayout.build(12, tp=1, pp=3)
    for group, pipe in zip(layout.groups("embd"), layout.groups("pp")):
        assert group == [pipe[0], pipe[-1]]
    assert ParallelLayout.build(4, tp=2).groups("embd") == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=6, tp=4), "--tensor-model-parallel-size 4"),
        (dict(world_size=8, tp=1, cp=3), "--context-parallel-size 3"),
        (dict(world_size=16, tp=2, ep=3), "tp*cp*dp != etp*ep*edp"),
        (dict(world_size=8, pp=2, ep=8), "--expert-model-parallel-size 8"),
        (dict(world_size=8, tp=0), "--tensor-model-parallel-size 0: must be at least 1"),
        (dict(world_size=8, order="tp-cp-dp-pp"), "--parallel-rank-order"),
        (dict(world_size=8, tp=2, etp=1, ep=2, order="tp-pp-cp-ep-dp", pp=2), "pipeline stage"),
    ],
)
def test_bad_layouts_name_the_flag(kwargs, message):
    world = kwargs.pop("world_size")
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        ParallelLayout.build(world, **kwargs)


def test_describe_lists_every_group_kind():
    text = ParallelLayout.build(64, tp=2, pp=4, ep=8).describe()
    for kind in (*GROUP_KINDS, "embd"):
        assert f"\n{kind} " in text
    assert "etp 2 x ep 8 x edp 1 x pp 4" in text


# ---------------------------------------------------------------------------------------------
# Multi-rank tier


def _check_groups(kwargs):
    state = ParallelState.build(**kwargs)
    rank = dist.get_rank()
    out = {}
    for kind in (*GROUP_KINDS, "embd"):
        group = state.group(kind)
        expected = [g for g in state.layout.groups(kind) if rank in g]
        if group is None:
            assert not expected
            continue
        assert list(group.ranks) == expected[0]
        assert group.ranks[group.rank] == rank
        # Sum of 2**rank over the group identifies its members exactly.
        t = torch.tensor([2.0**rank], dtype=torch.float64)
        dist.all_reduce(t, group=group.process_group)
        out[kind] = int(t.item())
    return out


@pytest.mark.parametrize("kwargs", [dict(tp=2, pp=2), dict(tp=2, ep=4, etp=1), dict(cp=2, ep=2, etp=2, tp=2)])
def test_process_groups_contain_their_members(workers, kwargs):
    results = workers(8).run(_check_groups, kwargs)
    layout = ParallelLayout.build(8, **kwargs)
    for rank, sums in enumerate(results):
        for kind, value in sums.items():
            members = next(g for g in layout.groups(kind) if rank in g)
            assert value == sum(2**r for r in members), (rank, kind)


def _threads_after_rebuilding(kwargs_list, repeats):
    import os

    first = ParallelState.build(**kwargs_list[0])
    for _ in range(repeats):
        for kwargs in kwargs_list:
            again = ParallelState.build(**kwargs)
    threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    # the same rank set is the same process group, whichever state asked for it
    assert ParallelState.build(**kwargs_list[0]).tp.process_group is first.tp.process_group
    assert again.dp.size >= 1
    return threads


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_rebuilding_states_reuses_process_groups(workers):
    """Each process group keeps threads that poll while idle: a pool that built a new group per
    state (one per test) spun at ~14% of a core per rank after 40 states. Identical rank sets
    must share one group, so building more states adds no threads."""
    layouts = [dict(tp=2), dict(tp=2, ep=2), dict(pp=2, ep=2), dict(cp=2, tp=2)]
    workers(4).run(_threads_after_rebuilding, layouts, 1)  # the pool's own threads start on first use
    few = workers(4).run(_threads_after_rebuilding, layouts, 2)
    many = workers(4).run(_threads_after_rebuilding, layouts, 20)
    assert many == few, (few, many)


def test_single_process_state():
    state = ParallelState.single()
    assert state.tp.size == state.ep.size == state.pp.size == 1
    assert state.is_first_stage and state.is_last_stage
    assert state.coords == dict(tp=0, cp=0, dp=0, pp=0, etp=0, ep=0, edp=0)


def test_topology_says_which_groups_cross_nodes():
    # 16 ranks on 2 nodes of 8: tp 2 and ep 4 (innermost) stay in a node, pp 2 (outermost) spans both
    layout = ParallelLayout.build(16, tp=2, pp=2, ep=4, etp=1)
    assert layout.topology(8) == ("topology: 2 node(s) x 8 GPUs; inside a node: tp 2, ep 4, dp 4, edp 2; "
                                  "across nodes: pp 2 over 2 nodes")
    # nodes of 4: dp (tp x dp = 8 ranks per stage) now crosses nodes, and so does expert-dp
    assert layout.topology(4) == ("topology: 4 node(s) x 4 GPUs; inside a node: tp 2, ep 4; across nodes: "
                                  "dp 4 over 2 nodes, edp 2 over 2 nodes, pp 2 over 2 nodes")
    assert "do not fill nodes of 3 evenly" in layout.topology(3)
