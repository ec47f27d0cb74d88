"""Muon against a float64 reference written from the equations (Keller Jordan's Muon, Moonlight's
scaling as Megatron-LM parameterises it), and in every layout against the single-process run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, every_rank_micro_batches, gather_all, gather_full, make_config
from megamoe.training import distributed_muon
from megamoe.training.checkpoint import load_checkpoint, save_checkpoint
from megamoe.training.muon import MixedPrecisionMuon, newton_schulz, newton_schulz_cost
from megamoe.training.train import MicroBatches, build_optimizer, train_step

DT = torch.float64
QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


def test_newton_schulz_keeps_the_singular_vectors_and_flattens_the_singular_values():
    g = torch.Generator().manual_seed(0)
    for shape in [(48, 16), (16, 48), (3, 32, 32)]:  # tall, wide, a batch of square ones
        # singular values spread 20-fold: far from orthogonal
        q1 = torch.linalg.qr(torch.randn(*shape[:-1], shape[-2], generator=g, dtype=DT)).Q
        q2 = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], shape[-1], generator=g, dtype=DT)).Q
        k = min(shape[-2:])
        spread = torch.logspace(0, -math.log10(20), k, dtype=DT)
        u = q1[..., :k] @ torch.diag_embed(spread.expand(*shape[:-2], k)) @ q2[..., :k, :]
        o = newton_schulz(u, 5, QUINTIC)
        left, sigma, right_t = torch.linalg.svd(u, full_matrices=False)
        # O = U f(S) V^T: in u's singular bases O is diagonal, with values pushed towards 1
        inner = left.mT @ o @ right_t.mT
        diagonal = torch.diagonal(inner, dim1=-2, dim2=-1)
        assert torch.allclose(inner, torch.diag_embed(diagonal), atol=1e-10)
        assert diagonal.min() > 0.6 and diagonal.max() < 1.25, (shape, diagonal.min(), diagonal.max())
        assert sigma.max() / sigma.min() > 19


def _reference_ns(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """One matrix's Newton-Schulz iteration, from the equations: X0 = U / |U|_F on the wide
    orientation, X <- a X + (b A + c A^2) X with A = X X^T."""
    transposed = x.shape[0] > x.shape[1]
    x = (x.T if transposed else x) / (torch.linalg.norm(x) + 1e-7)
    for i in range(steps):
        a, b, c = QUINTIC[min(i, 4)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def _reference_muon(w, m, g, lr, momentum, wd, extra, fused_halves):
    """The update of one weight (every matrix of it whole: single process): EMA momentum, the
    orthogonalised momentum scaled by sqrt(max(rows, cols)) x extra, decoupled weight decay.
    ``fused_halves``: the rows hold two matrices ([gate | up]), each orthogonalised alone."""
    m = momentum * m + (1 - momentum) * g
    matrices = [m] if m.ndim == 2 else list(m)
    updates = []
    for mat in matrices:
        blocks = mat.chunk(2, dim=0) if fused_halves else [mat]
        ortho = [_reference_ns(b) * math.sqrt(max(b.shape)) * extra for b in blocks]
        updates.append(torch.cat(ortho, dim=0))
    update = updates[0] if m.ndim == 2 else torch.stack(updates)
    return w * (1 - lr * wd) - lr * update, m


def test_muon_steps_follow_the_equations():
    cfg = make_config("mla", {})
    cfg.training.optimizer = "muon"
    cfg.training.muon_extra_scale_factor, cfg.training.weight_decay = 0.2, 0.1
    state = ParallelState.single()
    model = build(cfg, state)
    opt = MixedPrecisionMuon(model, cfg.training, state)
    params = dict(model.named_parameters())
    matrices = {n for n, p in params.items() if spec_of(p).role in ("linear", "router", "expert") and p.ndim >= 2}
    assert {"layers.1.ffn.experts.w13", "layers.0.attn.wkv_b.weight", "layers.1.ffn.gate.weight"} <= matrices
    assert not matrices & {"embed.weight", "head.weight"}
    ref = {n: p.detach().clone() for n, p in params.items()}
    ref_m = {n: torch.zeros_like(p) for n, p in params.items()}
    # AdamW for the rest: the embedding and the head decayed, norms (1-D) not
    others = [n for n in params if n not in matrices]
    adam = torch.optim.AdamW([{"params": [ref[n].requires_grad_() for n in others if ref[n].ndim >= 2],
                               "weight_decay": 0.1},
                              {"params": [ref[n].requires_grad_() for n in others if ref[n].ndim < 2],
                               "weight_decay": 0.0}],
                             lr=1.0, betas=(cfg.training.adam_beta1, cfg.training.adam_beta2), eps=cfg.training.adam_eps)
    g = torch.Generator().manual_seed(1)
    for step, lr in enumerate([1e-2, 5e-3, 2e-3], start=1):
        opt.zero_grad(1)
        grads = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
        for n, p in params.items():
            p.main_grad.copy_(grads[n])
        opt.step(lr)
        for n in params:
            if n in matrices:
                ref[n], ref_m[n] = _reference_muon(ref[n], ref_m[n], grads[n], lr, cfg.training.muon_momentum, 0.1,
                                                   0.2, fused_halves=n.endswith("experts.w13"))
        for group in adam.param_groups:
            group["lr"] = lr
        for n in params:
            if n not in matrices:
                ref[n].grad = grads[n].clone()
        adam.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=1e-10, atol=1e-12, msg=f"{n} step {step}")


def _muon_parity(layout: dict):
    """Three training steps in ``layout`` against the single-process run: every weight."""
    cfg = make_config("mla", layout)
    cfg.training.optimizer = "muon"
    state, single = ParallelState.build(**cfg.parallel.degrees()), ParallelState.single()
    ref_cfg = make_config("mla", {"gbs": cfg.training.global_batch_size})
    ref_cfg.training = copy.deepcopy(cfg.training)
    model, ref = build(cfg, state), build(ref_cfg, single)
    opt, ref_opt = build_optimizer(model, cfg, state), MixedPrecisionMuon(ref, cfg.training, single)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    sent: dict[str, int] = {}  # elements the distributed optimizer's exchanges sent to other ranks, per group
    exchange = distributed_muon.mappings.all_to_all_uneven

    def counting(x, group, output_splits, input_splits, async_op=False):
        if group.name in ("dp_cp", "edp"):  # the optimizer's (the EP dispatcher's are over "ep")
            sent[group.name] = sent.get(group.name, 0) + sum(input_splits) - input_splits[group.rank]
        return exchange(x, group, output_splits, input_splits, async_op)

    for step in range(1, cfg.training.train_iters + 1):
        mine = [data.get(step - 1, j) for j in range(data.num_micro)]
        everyone = every_rank_micro_batches(data, state, step)
        distributed_muon.mappings.all_to_all_uneven = counting
        try:
            got = train_step(model, opt, mine, step, cfg, state, None)
        finally:
            distributed_muon.mappings.all_to_all_uneven = exchange
        want = train_step(ref, ref_opt, everyone, step, ref_cfg, single, None)
        assert abs(got.lm_loss - want.lm_loss) <= 1e-9 * abs(want.lm_loss), (step, got.lm_loss, want.lm_loss)
    ref_params = dict(ref.named_parameters())
    weights = gather_all({name: (p.detach(), p) for name, p in model.named_parameters()}, state)
    for name, weight in weights.items():
        ref_p = ref_params[name]
        torch.testing.assert_close(weight, gather_full(ref_p.detach(), ref_p, single), **TOL, msg=f"weight {name}")
    # the distributed optimizer's owners: (group, matrices, this rank's Newton-Schulz cost, the largest,
    # elements sent per step, elements of the group's matrices)
    return [((e.group.name, e.group.ranks), len(e.matrices), sum(newton_schulz_cost(m.param) for m in e.mine),
             max(newton_schulz_cost(m.param) for m in e.matrices), sent.get(e.group.name, 0) / cfg.training.train_iters,
             sum(m.hi - m.lo for m in e.matrices)) for e in getattr(opt, "exchanges", [])]


LAYOUTS = {
    "tp2": (2, {"tp": 2}),
    "tp2,sp": (2, {"tp": 2, "sp": True}),
    "ep2,etp2": (4, {"ep": 2, "etp": 2, "dispatcher": "alltoall"}),  # expert matrices cut over expert-TP
    "pp2": (2, {"pp": 2}),
    "dp2": (2, {"gbs": 4}),
    # the distributed optimizer: each whole matrix orthogonalised by one owner; small buckets
    # cut matrices across shards, and clipping exercises the fused-AdamW divisor
    "dp2,distopt": (2, {"gbs": 4, "distopt": True, "bucket": 3000, "clip": 0.05}),
    "dp2,tp2,distopt": (4, {"gbs": 4, "tp": 2, "sp": True, "distopt": True, "bucket": 3000}),
    "dp4,ep2,etp2,distopt": (8, {"gbs": 8, "ep": 2, "etp": 2, "dispatcher": "alltoall", "distopt": True}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_muon_in_every_layout_matches_single_process(workers, layout):
    world, spec = LAYOUTS[layout]
    owners = workers(world).run(_muon_parity, spec)
    if spec.get("distopt"):  # every group's matrices split over its ranks, each rank's share within one matrix
        by_group: dict[tuple, list] = {}
        for rank_owners in owners:
            for ranks, total, cost, largest, sent, elements in rank_owners:
                by_group.setdefault(ranks, []).append((total, cost, largest, sent, elements))
        assert by_group
        for ranks, shares in by_group.items():
            costs = [cost for _, cost, _, _, _ in shares]
            assert len(shares) == len(ranks[1]) and min(costs) > 0, (ranks, shares)
            assert max(costs) - min(costs) <= shares[0][2], (ranks, costs)
            # what moves: each rank's shard of the matrices, less what it owns, there and back:
            # on average 2 (n - 1) / n^2 of the matrices' elements per rank and step
            n, elements = len(ranks[1]), shares[0][4]
            mean_sent = sum(s[3] for s in shares) / n
            expected = 2 * (n - 1) / n**2 * elements
            assert abs(mean_sent - expected) <= 0.25 * expected, (ranks, mean_sent, expected)


def test_muon_flags_refuse_what_is_not_built():
    def check(*flags):
        validate(parse_config(["--config", "examples/configs/demo.yaml", "--optimizer", "muon", *flags]), 1)

    check()  # Megatron-LM's defaults
    check("--use-distributed-optimizer")
    with pytest.raises(ConfigError, match="--muon-tp-mode blockwise.*change with the layout"):
        check("--muon-tp-mode", "blockwise")
    with pytest.raises(ConfigError, match="--muon-momentum 1.5"):
        check("--muon-momentum", "1.5")


def _muon_phase(layout: dict, directory: str, phase: str):
    """Muon steps 1-2 then a save ('save'), a load then steps 3-4 ('load'), or steps 1-4
    ('all'): the losses and the weights after them (global tensors of this rank's stage)."""
    cfg = make_config("mla", {**layout, "gbs": 4})
    cfg.training.optimizer, cfg.training.train_iters = "muon", 4
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    steps = {"save": range(1, 3), "load": range(3, 5), "all": range(1, 5)}[phase]
    if phase == "load":
        load_checkpoint(directory, model, opt, state, cfg, None, torch.device("cpu"))
    losses = [train_step(model, opt, [data.get(s - 1, j) for j in range(data.num_micro)], s, cfg, state, None).lm_loss
              for s in steps]
    if phase == "save":
        save_checkpoint(directory, 2, model, opt, state, cfg, 8, None, torch.device("cpu"))
    return losses, gather_all({name: (p.detach(), p) for name, p in model.named_parameters()}, state)


@pytest.mark.parametrize("saved, loaded", [((2, {"tp": 2, "sp": True}), (4, {"ep": 2, "etp": 2, "dispatcher": "alltoall"})),
                                           ((4, {"ep": 2, "etp": 2, "dispatcher": "alltoall"}), (1, {})),
                                           ((2, {"distopt": True, "bucket": 3000}), (2, {"tp": 2}))],
                         ids=["tp2,sp:ep2,etp2", "ep2,etp2:single", "dp2,distopt:tp2"])
def test_muon_state_survives_a_checkpoint_in_another_layout(workers, tmp_path, saved, loaded):
    """Saved in one layout after two steps, loaded in another for two more: the single process's
    four uninterrupted steps (losses, and weights), so the momentum came back whole."""
    def run(world, layout, phase):
        if world == 1:
            return _muon_phase(layout, str(tmp_path), phase)
        return workers(world).run(_muon_phase, layout, str(tmp_path), phase)[0]

    want_losses, want_weights = _muon_phase({}, "", "all")
    first, _ = run(*saved, "save")
    rest, weights = run(*loaded, "load")
    for got, want in zip(first + rest, want_losses):
        assert abs(got - want) <= 1e-9 * abs(want), (first + rest, want_losses)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, want_weights[name], **TOL, msg=name)


def test_newton_schulz_flops_are_the_matmuls_it_runs():
    """The planner's FLOP count (muon.newton_schulz_flops) against torch's count of the matmuls
    newton_schulz really runs: a stack of 3 wide matrices, a tall one, and a fused [gate | up]."""
    from torch.utils.flop_counter import FlopCounterMode

    from megamoe.parallel.param_spec import ParamSpec, Split, set_spec
    from megamoe.training.muon import newton_schulz_flops

    cases = [(torch.nn.Parameter(torch.zeros(3, 48, 80)), None, [(3, 48, 80)]),
             (torch.nn.Parameter(torch.zeros(96, 40)), None, [(96, 40)]),
             (torch.nn.Parameter(torch.zeros(2, 2 * 24, 64)),
              ParamSpec("expert", (2, 48, 64), (Split(1, "etp", parts=2),)), [(2, 2, 24, 64)])]
    for p, spec, shapes in cases:
        if spec is not None:
            set_spec(p, spec)
        with FlopCounterMode(display=False) as counter:
            for shape in shapes:
                newton_schulz(torch.randn(shape), 5, QUINTIC)
        assert newton_schulz_flops(p, 5) == counter.get_total_flops(), (p.shape, counter.get_total_flops())
