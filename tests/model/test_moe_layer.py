"""The MoE layer against an explicit per-token sum over its chosen experts (float64), dropping
and padding semantics, backend agreement, and multi-token prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import Config
from megamoe.model.experts import GroupedExperts
from megamoe.model.gpt import GPTModel
from megamoe.model.mlp import MLP
from megamoe.model.moe import MoELayer
from megamoe.model.router import TopKRouter
from megamoe.parallel.expert_parallel import AllGatherDispatcher
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import ParallelState
from megamoe.testing.presets import preset
from megamoe.training.train import build_model

DT = torch.float64
SINGLE = ParallelState.single()


def make_layer(shared: bool = True, capacity: float | None = None, pad: bool = False, backend="loop",
               device="cpu", dtype=DT, E=6, K=2, D=16, F_=24, gated: bool = True) -> MoELayer:
    torch.manual_seed(0)
    router = TopKRouter(D, E, K, score_function="softmax", capacity_factor=capacity, device=device, dtype=dtype)
    experts = GroupedExperts(E, E, 0, D, F_, SINGLE.etp, backend=backend, gated=gated, device=device, dtype=dtype)
    mlp = MLP(D, 20, SINGLE.tp, gated=gated, device=device, dtype=dtype) if shared else None
    layer = MoELayer(router, experts, mlp, AllGatherDispatcher(SINGLE.etp_ep, E, E, 0, pad), SINGLE.tp)
    for i, (_, mod) in enumerate(layer.named_modules()):
        if hasattr(mod, "init_weights") and mod is not layer:
            mod.init_weights(torch.Generator(device=device).manual_seed(i + 1))
    return layer


def explicit(layer: MoELayer, x_SBD: torch.Tensor) -> torch.Tensor:
    routing = layer.route(x_SBD)
    x_TD = x_SBD.reshape(-1, x_SBD.shape[-1])
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.experts_TK.shape[1]):
            e = routing.experts_TK[t, k].item()
            if routing.kept_TK is not None and not routing.kept_TK[t, k]:
                continue
            w = ex.stacked()
            if ex.gated:  # SwiGLU
                h = F.silu(w["w1"][e] @ x_TD[t]) * (w["w3"][e] @ x_TD[t])
            else:  # GeLU
                h = F.gelu(w["w1"][e] @ x_TD[t])
            out[t] += routing.probs_TK[t, k] * (ex.w2[e] @ h)
    out = out.view_as(x_SBD)
    if layer.shared_experts is not None:
        m = layer.shared_experts
        if m.w3 is not None:
            out = out + (F.silu(x_SBD @ m.w1.weight.T) * (x_SBD @ m.w3.weight.T)) @ m.w2.weight.T
        else:
            out = out + F.gelu(x_SBD @ m.w1.weight.T) @ m.w2.weight.T
    return out


@pytest.mark.parametrize("shared, gated", [(False, True), (True, True), (True, False)])
def test_moe_equals_per_token_sum(shared, gated):
    layer = make_layer(shared=shared, gated=gated)
    x = torch.randn(5, 3, 16, dtype=DT)
    out, stats = layer(x)
    torch.testing.assert_close(out, explicit(layer, x), rtol=1e-12, atol=1e-12)
    assert stats.tokens_per_expert.sum().item() == 5 * 3 * 2


@pytest.mark.parametrize("pad", [False, True])
def test_capacity_drops_and_padding_changes_nothing_else(pad):
    layer = make_layer(capacity=0.5, pad=pad)
    x = torch.randn(6, 2, 16, dtype=DT, requires_grad=True)
    out, stats = layer(x)
    assert stats.num_dropped.item() > 0
    torch.testing.assert_close(out, explicit(layer, x), rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    grad_pad = x.grad.clone()
    x.grad = None
    explicit(layer, x).square().sum().backward()
    torch.testing.assert_close(grad_pad, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_fp8_padding_changes_no_output_or_gradient(dispatcher):
    """--moe-router-padding-for-fp8: every expert's rows padded to 16 with zero rows, and the
    unpadded layer's results. Zero rows add exact zeros to every sum, but not always the same
    bits: the BLAS may pick another kernel (another summation order) for the longer matrices,
    which moved float32 results by one unit in the last place on one machine and not on
    another. So float64, compared to 1e-13 (summation order), not bit for bit."""
    from megamoe.parallel.expert_parallel import AllToAllDispatcher

    def run(pad_multiple):
        layer = make_layer()
        if dispatcher == "alltoall":
            layer.dispatcher = AllToAllDispatcher(SINGLE.ep, SINGLE.etp, 6, pad_multiple=pad_multiple)
        else:
            layer.dispatcher = AllGatherDispatcher(SINGLE.etp_ep, 6, 6, 0, pad_multiple=pad_multiple)
        seen = []
        experts_forward = layer.experts.forward
        layer.experts.forward = lambda x, counts, *rest: seen.append((x.detach().clone(), counts.clone())) or \
            experts_forward(x, counts, *rest)
        x = torch.randn(7, 3, 16, dtype=DT, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}, seen[0]

    out, dx, grads, (_, counts) = run(1)
    out_p, dx_p, grads_p, (rows_p, counts_p) = run(16)
    assert (counts_p % 16 == 0).all() and (counts_p >= counts).all() and (counts_p > counts).any()
    starts = torch.cumsum(counts_p, 0) - counts_p
    for e in range(6):  # each expert's rows: its tokens, then zero rows (no FP8 scale sees them)
        lo, real, hi = starts[e].item(), counts[e].item(), counts_p[e].item()
        assert (rows_p[lo + real: lo + hi] == 0).all() and (rows_p[lo: lo + real] != 0).any(dim=1).all()
    exact = dict(rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(out_p, out, **exact)
    torch.testing.assert_close(dx_p, dx, **exact)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_p[name], grad, **exact, msg=name)


@pytest.mark.parametrize("capacity, pad", [(None, 1), (1.0, 1), (None, 16)], ids=["dropless", "capacity", "fp8_pad"])
def test_chunked_all_to_all_gives_the_layers_results(capacity, pad):
    """--moe-a2a-overlap-chunks 3 (one process): each chunk dispatched, run and combined on its
    own gives the one-exchange layer's output and gradients (float64; per-expert sums over rows
    in another grouping)."""
    from megamoe.parallel.expert_parallel import AllToAllDispatcher

    def run(num_chunks):
        layer = make_layer(capacity=capacity)
        layer.dispatcher = AllToAllDispatcher(SINGLE.ep, SINGLE.etp, 6, pad_multiple=pad, num_chunks=num_chunks)
        x = torch.randn(7, 3, 16, dtype=DT, generator=torch.Generator().manual_seed(6), requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}

    out, dx, grads = run(1)
    out_c, dx_c, grads_c = run(3)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dx_c, dx, rtol=1e-12, atol=1e-14)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_backends_agree_on_cpu_by_falling_back():
    loop, torch_backend = make_layer(backend="loop"), make_layer(backend="torch")
    x = torch.randn(4, 2, 16, dtype=DT)
    torch.testing.assert_close(loop(x)[0], torch_backend(x)[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "te"])
def test_backends_agree_on_gpu(backend):
    if backend == "te":
        pytest.importorskip("transformer_engine.pytorch")
    kw = dict(device="cuda", dtype=torch.bfloat16, E=8, K=2, D=128, F_=256)
    ref, other = make_layer(backend="loop", **kw), make_layer(backend=backend, **kw)
    x = torch.randn(64, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out_ref, _ = ref(x)
    out_ref.float().square().sum().backward()
    g_ref = x.grad.clone()
    x.grad = None
    out, _ = other(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), g_ref.float(), rtol=5e-2, atol=5e-2)
    ref_grads, other_grads = ref.experts.stacked(grads=True), other.experts.stacked(grads=True)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(other_grads[name].float(), ref_grads[name].float(), rtol=5e-2, atol=5e-2)


def tiny_config(**model) -> Config:
    cfg = preset("demo")
    cfg.model.seq_length = 12
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def build(cfg: Config, state=SINGLE) -> GPTModel:
    cfg.training.seed = 7
    return build_model(cfg, state, "cpu", dtype=DT)


def test_mtp_loss_predicts_depth_plus_one_ahead():
    cfg = tiny_config(mtp_num_layers=2)
    model = build(cfg)
    tokens = torch.randint(0, 500, (2, 12))
    labels = torch.randint(0, 500, (2, 12))
    out = model(tokens, labels)
    # By hand: run the trunk, then each depth k on the embedding of token i+k, predicting labels[i+k].
    t_SB, l_SB = tokens.t(), labels.t()
    pos = torch.arange(12)
    h = model.embed(t_SB)
    for block in model.layers.values():
        h, _ = block(h, pos)
    for k, mtp in enumerate(model.mtp, start=1):
        ahead = torch.cat([t_SB[k:], t_SB[:k]])  # token i+k at position i (tail is masked below)
        h, _ = mtp(h, model.embed(ahead), pos)
        logits = model.head(mtp.norm(h))[: 12 - k].reshape(-1, model.padded_vocab)  # vocab 512: no padding
        expected = F.cross_entropy(logits, l_SB[k:].reshape(-1), reduction="sum")
        torch.testing.assert_close(out.mtp_loss_sums[k - 1], expected, rtol=1e-10, atol=1e-10)
        assert out.mtp_num_tokens[k - 1].item() == (12 - k) * 2


def test_padded_vocabulary_is_masked():
    cfg = tiny_config()
    cfg.data.vocab_size = 500  # padded to 512
    model = build(cfg)
    tokens, labels = torch.randint(0, 500, (2, 12)), torch.randint(0, 500, (2, 12))
    out = model(tokens, labels)
    h = model.embed(tokens.t())
    for block in model.layers.values():
        h, _ = block(h, torch.arange(12))
    logits = model.head(model.norm(h))[..., :500]  # only the real vocabulary
    expected = F.cross_entropy(logits.reshape(-1, 500), labels.t().reshape(-1), reduction="sum")
    torch.testing.assert_close(out.lm_loss_sum, expected, rtol=1e-10, atol=1e-10)


def test_tied_embeddings_share_the_table():
    cfg = tiny_config(untie_embeddings_and_output_weights=False)
    model = build(cfg)
    assert model.head is None
    out = model(torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12)))
    out.lm_loss_sum.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity, dropout", [("full", 0.0), ("selective", 0.0), ("full", 0.2),
                                                  ("selective", 0.2), ("moe", 0.2), ("mlp shared_experts", 0.2)])
def test_recompute_gives_the_same_loss_and_gradients(granularity, dropout, monkeypatch):
    """Recomputation changes no number, dropout included: the replayed forward draws the same
    masks from the default stream and from the tracker's tensor-parallel stream (attention
    dropout forks into it), although both have advanced by the time backward runs."""
    import megamoe.model.attention as attention

    calls = {"attention": 0, "route": 0, "mlp": 0}
    original_core, original_route, original_mlp = attention.core_attention, MoELayer.route, MLP.forward

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(attention, "core_attention", count("attention", original_core))
    monkeypatch.setattr(MoELayer, "route", count("route", original_route))
    monkeypatch.setattr(MLP, "forward", count("mlp", original_mlp))  # dense FFNs and shared experts
    cfg = tiny_config(mtp_num_layers=1, attention_dropout=dropout, hidden_dropout=dropout)
    plain = build(cfg)
    if granularity == "moe":
        cfg.moe.moe_layer_recompute = True
    elif granularity in ("full", "selective"):
        cfg.model.recompute_granularity = granularity
    else:  # --recompute-granularity selective --recompute-modules mlp shared_experts
        cfg.model.recompute_granularity, cfg.model.recompute_modules = "selective", granularity.split()
    recomputed = build(cfg)
    tokens, labels = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    losses, counts = [], []
    for model in (plain, recomputed):
        model.train()
        for key in calls:
            calls[key] = 0
        tracker = model_parallel_seed(5, SINGLE)  # the same streams for both runs
        out = model(tokens, labels, rng_tracker=tracker)
        loss = out.lm_loss_sum + out.mtp_loss_sums[0] + sum(s.aux_loss for s in out.moe_stats)
        loss.backward()
        losses.append(loss.detach())
        counts.append(dict(calls))
    # 4 decoder layers (1 dense, 3 MoE with a shared expert) + 1 MTP block (MoE); recomputation
    # runs the decoder layers again (full recompute), every attention core (selective), every
    # MoE layer's routing and shared expert (--moe-layer-recompute), or the dense MLP and the
    # four shared experts (--recompute-modules mlp shared_experts).
    assert counts[0] == {"attention": 5, "route": 4, "mlp": 5}
    expected = {"full": {"attention": 9, "route": 7, "mlp": 9}, "selective": {"attention": 10, "route": 4, "mlp": 5},
                "moe": {"attention": 5, "route": 8, "mlp": 9},
                "mlp shared_experts": {"attention": 5, "route": 4, "mlp": 10}}[granularity]
    assert counts[1] == expected
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_expert_overlap_changes_nothing_but_streams():
    layer = make_layer(device="cuda", dtype=torch.float32, D=64, F_=128)
    x = torch.randn(128, 4, 64, device="cuda", requires_grad=True)
    results = []
    for overlap in (False, True):
        layer.shared_expert_overlap = overlap
        x.grad = None
        layer.zero_grad()
        out, _ = layer(x)
        out.square().sum().backward()
        torch.cuda.synchronize()
        results.append((out.detach(), x.grad.clone(), layer.shared_experts.w1.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recompute_inside_overlapped_pieces_changes_no_number(monkeypatch):
    """Under --overlap-moe-expert-parallel-comm a block runs as pieces cut at its exchanges, and
    recompute there rebuilds what lies between the exchanges (the attention half under full
    recompute, the routed and shared experts' MLPs under both) without routing or exchanging
    again. One step of two paired micro-batches against the plain run: same loss and
    gradients, and the recomputed parts ran twice, the routing once."""
    import megamoe.model.attention as attention
    from megamoe.model.experts import GroupedExperts as Experts
    from megamoe.testing.parity import make_config
    from megamoe.training.optimizer import MixedPrecisionAdamW
    from megamoe.training.train import MicroBatches, train_step

    calls = {"attention": 0, "route": 0, "experts": 0, "mlp": 0}

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(attention, "core_attention", count("attention", attention.core_attention))
    monkeypatch.setattr(MoELayer, "route", count("route", MoELayer.route))
    monkeypatch.setattr(Experts, "forward", count("experts", Experts.forward))
    monkeypatch.setattr(MLP, "forward", count("mlp", MLP.forward))  # shared experts and dense FFNs
    runs = {}
    for name, layout in [("plain", {}), ("pieces", dict(moe_overlap=True)),
                         ("full", dict(moe_overlap=True, recompute="full")),
                         ("moe", dict(moe_overlap=True, moe_recompute=True))]:
        cfg = make_config("mla", dict(dispatcher="alltoall", gbs=2, **layout))
        model = build_model(cfg, SINGLE, "cpu", dtype=DT)
        opt = MixedPrecisionAdamW(model, cfg.training, SINGLE)
        data = MicroBatches(cfg, SINGLE, torch.device("cpu"))
        for key in calls:
            calls[key] = 0
        got = train_step(model, opt, [data.get(0, j) for j in range(data.num_micro)], 1, cfg, SINGLE, None)
        runs[name] = got.lm_loss, {n: p.main_grad.clone() for n, p in model.named_parameters()}, dict(calls)
    layers = len(model.layers)
    moe_layers = sum(isinstance(b.ffn, MoELayer) for b in model.layers.values())
    once = runs["pieces"][2]
    assert once == runs["plain"][2] and once["route"] == 2 * moe_layers and once["attention"] == 2 * layers
    assert runs["moe"][2] == {**once, "experts": 2 * once["experts"], "mlp": once["mlp"] + 2 * moe_layers}
    assert runs["full"][2] == {"attention": 2 * once["attention"], "route": once["route"],
                               "experts": 2 * once["experts"], "mlp": 2 * once["mlp"]}
    for name in ("pieces", "full", "moe"):
        loss, grads, _ = runs[name]
        assert abs(loss - runs["plain"][0]) <= 1e-12 * abs(loss), name
        for key, grad in grads.items():
            torch.testing.assert_close(grad, runs["plain"][1][key], rtol=1e-10, atol=1e-14, msg=f"{name} {key}")
