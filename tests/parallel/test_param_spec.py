"""Parameter specs (parallel/param_spec.py): the pieces of the global tensor each rank holds,
checked by hand for a fused gate/up expert weight under EP x expert-TP and a padded vocabulary
under TP, and every layer's spec against the single-process model's shapes."""

from __future__ import annotations

import torch

from megamoe.parallel.param_spec import ParamSpec, Split, global_name, spec_of
from megamoe.parallel.state import ParallelState
from megamoe.testing.distributed import fake_state
from megamoe.testing.presets import preset
from megamoe.training.train import build_model


def test_fused_expert_weight_boxes_under_ep_and_expert_tp():
    # 8 experts of ffn 6 (gate and up: 12 rows), hidden 4; EP 2 x expert-TP 2 over 4 ranks
    spec = ParamSpec("expert", (8, 12, 4), (Split(0, "ep"), Split(1, "etp", parts=2)))
    state = fake_state(4, rank=3, ep=2, etp=2, tp=2)  # etp rank 1, ep rank 1
    assert (state.etp.rank, state.ep.rank) == (1, 1)
    assert spec.local_shape(state) == (4, 6, 4)  # 4 experts, [3 gate rows; 3 up rows]
    boxes = spec.boxes(state)
    assert [(b.offsets, b.sizes) for b in boxes] == [((4, 3, 0), (4, 3, 4)), ((4, 9, 0), (4, 3, 4))]
    assert [b.slices[1] for b in boxes] == [slice(0, 3), slice(3, 6)]
    assert spec.replica_groups() == ("edp",) and spec.is_owner(state)


def test_padded_vocabulary_boxes_leave_the_padding_out():
    # 10 real rows padded to 16, over TP 4: 4 rows each; rank 2 holds 8..9 and padding, rank 3 only padding
    spec = ParamSpec("embedding", (10, 3), (Split(0, "tp", padded=16),))
    boxes = [spec.boxes(fake_state(4, rank=r, tp=4)) for r in range(4)]
    assert [[(b.offsets, b.sizes) for b in bs] for bs in boxes] == [
        [((0, 0), (4, 3))], [((4, 0), (4, 3))], [((8, 0), (2, 3))], []]
    assert spec.local_shape(fake_state(4, rank=3, tp=4)) == (4, 3)


def test_replicas_and_owners():
    norm = ParamSpec("norm", (8,), grad_partial_over_tp=True)
    owners = [r for r in range(4) if norm.is_owner(fake_state(4, rank=r, tp=2))]  # tp 2 x dp 2
    assert owners == [0] and norm.replica_groups() == ("dp", "cp", "tp")
    shared = ParamSpec("embedding", (10, 3), (Split(0, "tp"),), shared_embedding=True)
    last_stage = fake_state(2, rank=1, pp=2)
    assert not shared.is_owner(last_stage) and shared.is_owner(last_stage, within_stage=True)


def test_every_parameter_has_a_spec_that_matches_its_shape():
    """Each parameter of the single-process demo model has a spec whose global name and shape
    are its own (the vocabulary unpadded) and whose local shape is its tensor's."""
    cfg = preset("demo")
    single = build_model(cfg, ParallelState.single(), torch.device("cpu"))
    want = {name: tuple(p.shape) for name, p in single.named_parameters()}
    want["embed.weight"] = (cfg.data.vocab_size, cfg.model.hidden_size)  # unpadded
    if "head.weight" in want:
        want["head.weight"] = (cfg.data.vocab_size, cfg.model.hidden_size)
    for name, p in single.named_parameters():
        spec = spec_of(p)
        assert getattr(p, "spec", None) is not None, name
        assert global_name(name, spec) == name and spec.shape == want[name], name
        assert spec.local_shape(ParallelState.single()) == tuple(p.shape), name
    roles = {spec_of(p).role for p in single.parameters()}
    assert {"embedding", "linear", "norm", "router", "expert"} <= roles
