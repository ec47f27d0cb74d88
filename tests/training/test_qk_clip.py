"""MuonClip's qk-clip and the per-head max-logit pass: the kernel against the naive attention
matrix, the clip against its defining property (a clipped head's largest logit becomes the
threshold), and training with the clip on in several layouts against the single process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.kernels.max_logit import MaxLogitTracker, max_logits
from megamoe.model import attention as attention_module
from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, every_rank_micro_batches, gather_full, make_config
from megamoe.training.muon import MixedPrecisionMuon
from megamoe.training.qk_clip import qk_clip_edit
from megamoe.training.train import MicroBatches, build_optimizer, train_step

DT = torch.float64


def _naive_max(q, k, scale, causal):
    """Per head: the whole attention matrix, masked, its maximum. ``q`` [b, h, sq, d], ``k``
    [b, hk, sk, d]; causal aligned bottom-right."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        visible = (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)).to(q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("heads, kv_heads, sq, sk, causal", [(4, 4, 16, 16, True), (8, 2, 16, 16, True),
                                                              (4, 2, 8, 24, True), (4, 4, 8, 8, False)])
def test_max_logit_pass_matches_the_attention_matrix(heads, kv_heads, sq, sk, causal):
    g = torch.Generator().manual_seed(heads * sk)
    q = torch.randn(2, heads, sq, 8, generator=g, dtype=DT)
    k = torch.randn(2, kv_heads, sk, 8, generator=g, dtype=DT)
    q[1, 0, 0] *= 50  # a large logit that the causal mask hides from query 0 unless it sees key 0 only
    want = _naive_max(q, k, 0.3, causal)
    for chunk_bytes in (1, 3 * 2 * heads * sk * 8, 1 << 30):  # one row, three rows, everything at once
        torch.testing.assert_close(max_logits(q, k, 0.3, causal, chunk_bytes).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads, kv_heads, sq, sk, d, causal", [(16, 16, 300, 300, 192, True),
                                                                (8, 2, 128, 384, 64, True),
                                                                (4, 4, 100, 100, 128, False)])
def test_triton_max_logit_kernel_matches_the_attention_matrix(heads, kv_heads, sq, sk, d, causal):
    """The Triton pass on bf16 (permuted views, as the attention cores pass them) against the
    naive matrix of the same bf16 values in float32: only the summation order differs."""
    g = torch.Generator(device="cuda").manual_seed(sq)
    q = torch.randn(sq, 2, heads, d, generator=g, device="cuda").bfloat16().permute(1, 2, 0, 3)
    k = torch.randn(sk, 2, kv_heads, d, generator=g, device="cuda").bfloat16().permute(1, 2, 0, 3)
    q[1, 0, -1] *= 30  # the last query of a head sees every key
    want = _naive_max(q.float(), k.float(), 0.1, causal)
    torch.testing.assert_close(max_logits(q, k, 0.1, causal), want, rtol=1e-4, atol=1e-4)


def _attention_maxima(attn, x, positions):
    """The tracker's per-head maxima for one forward of ``attn``, and the naive ones from the
    same queries and keys (the attention core's SDPA call, intercepted)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(_naive_max(q, k, kw["scale"], True))
        return sdpa(q, k, v, **kw)

    attn.max_logits = MaxLogitTracker()
    attention_module.F.scaled_dot_product_attention = spy
    try:
        attn(x, positions)
    finally:
        attention_module.F.scaled_dot_product_attention = sdpa
    return attn.max_logits.take(), seen[0]


@pytest.mark.parametrize("variant", ["mla", "gqa"])
def test_a_clipped_head_reaches_the_threshold_and_no_more(variant):
    """Head 0's queries are blown up past tau; after the clip the same input gives it exactly
    tau (for GQA, the largest head of its key group), and every other head is untouched."""
    cfg = make_config(variant, {})
    cfg.training.qk_clip, cfg.training.qk_clip_alpha = True, 0.3
    attn = build(cfg, ParallelState.single()).layers["0"].attn
    x = torch.randn(16, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(0), dtype=DT)
    positions = torch.arange(16)
    q_weight = (attn.wq_b if variant == "mla" else attn.wq).weight
    rows = q_weight.shape[0] // attn.num_local_heads
    with torch.no_grad():
        q_weight[:rows] *= 40
    before, naive = _attention_maxima(attn, x, positions)
    torch.testing.assert_close(before, naive, rtol=1e-9, atol=1e-9)
    tau = float(before[0]) / 3
    cfg.training.qk_clip_threshold = tau
    assert (before[1:] < tau).all(), before  # only head 0 (and, for GQA, its group) is over
    untouched = {n: p.detach().clone() for n, p in attn.named_parameters()}
    qk_clip_edit({attn: before}, cfg.training)([(p, 0, p) for p in attn.parameters()])
    after, _ = _attention_maxima(attn, x, positions)
    group = attn.num_local_heads // getattr(attn, "num_local_kv", attn.num_local_heads)
    gamma = tau / before[:group].max()
    torch.testing.assert_close(after[:group], before[:group] * gamma, rtol=1e-9, atol=0)
    assert abs(float(after[:group].max()) - tau) <= 1e-9 * tau
    torch.testing.assert_close(after[group:], before[group:], rtol=1e-12, atol=0)
    changed = {n for n, p in attn.named_parameters() if not torch.equal(p, untouched[n])}
    if variant == "mla":  # the shared rope key (wkv_a) and the values stay
        assert changed == {"wq_b.weight", "wkv_b.weight"}, changed
        per_head = attn.nope_dim + attn.v_dim
        assert torch.equal(attn.wkv_b.weight[attn.nope_dim:per_head], untouched["wkv_b.weight"][attn.nope_dim:per_head])
    else:
        assert changed == {"wq.weight", "wk.weight"}, changed


def _clip_parity(layout: dict, variant: str, tau: float):
    """Three steps with qk-clip at ``tau`` in ``layout`` against the single process: losses,
    every layer's max logit, every weight. Returns the single process's step-1 maxima."""
    cfg = make_config(variant, layout)
    cfg.training.optimizer = "muon"
    cfg.training.qk_clip, cfg.training.qk_clip_threshold = True, tau
    state, single = ParallelState.build(**cfg.parallel.degrees()), ParallelState.single()
    ref_cfg = make_config(variant, {"gbs": cfg.training.global_batch_size})
    ref_cfg.training = copy.deepcopy(cfg.training)
    model, ref = build(cfg, state), build(ref_cfg, single)
    opt, ref_opt = build_optimizer(model, cfg, state), MixedPrecisionMuon(ref, cfg.training, single)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    first = None
    for step in range(1, cfg.training.train_iters + 1):
        mine = [data.get(step - 1, j) for j in range(data.num_micro)]
        got = train_step(model, opt, mine, step, cfg, state, None)
        want = train_step(ref, ref_opt, every_rank_micro_batches(data, state, step), step, ref_cfg, single, None)
        assert abs(got.lm_loss - want.lm_loss) <= 1e-9 * abs(want.lm_loss), (step, got.lm_loss, want.lm_loss)
        torch.testing.assert_close(torch.tensor(got.max_attention_logits), torch.tensor(want.max_attention_logits),
                                   rtol=1e-6, atol=0)
        first = first or want.max_attention_logits
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(gather_full(p.detach(), p, state), gather_full(ref_params[name].detach(),
                                   ref_params[name], single), **TOL, msg=f"weight {name}")
    return first


CLIP_LAYOUTS = {
    "tp2": (2, "mla", {"tp": 2, "sp": True}),
    "cp2,ring": (2, "mla", {"cp": 2, "cp_comm": "p2p"}),
    "cp2,allgather,gqa": (2, "gqa", {"cp": 2, "cp_comm": "allgather"}),
    "dp2,distopt": (2, "mla", {"gbs": 4, "distopt": True}),
    "pp2": (2, "mla", {"pp": 2}),
}


@pytest.mark.parametrize("layout", list(CLIP_LAYOUTS))
def test_qk_clip_in_every_layout_matches_single_process(workers, layout):
    world, variant, spec = CLIP_LAYOUTS[layout]
    tau = 0.05  # below the tiny model's largest logits (checked), so heads are clipped every step
    first = workers(world).run(_clip_parity, spec, variant, tau)[0]
    assert max(first) > tau, first


def test_qk_clip_changes_training():
    """The clip is not a no-op at the threshold the layouts use: the single process's weights
    after a step differ with and without it."""
    weights = []
    for clip in (True, False):
        cfg = make_config("mla", {"iters": 1})
        cfg.training.optimizer, cfg.training.qk_clip, cfg.training.qk_clip_threshold = "muon", clip, 0.05
        state = ParallelState.single()
        model = build(cfg, state)
        opt = build_optimizer(model, cfg, state)
        data = MicroBatches(cfg, state, torch.device("cpu"))
        train_step(model, opt, [data.get(0, j) for j in range(data.num_micro)], 1, cfg, state, None)
        weights.append(model.layers["0"].attn.wq_b.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


def test_qk_clip_flags():
    def check(*flags):
        validate(parse_config(["--config", "examples/configs/demo.yaml", *flags]), 1)

    check("--qk-clip", "--qk-clip-threshold", "100", "--qk-clip-alpha", "0.5", "--log-max-attention-logit")
    with pytest.raises(ConfigError, match="--qk-clip-alpha 1.0"):
        check("--qk-clip", "--qk-clip-alpha", "1.0")
    with pytest.raises(ConfigError, match="--qk-clip-threshold -1.0"):
        check("--qk-clip", "--qk-clip-threshold", "-1")
    with pytest.raises(ConfigError, match="--qk-clip with --qk-layernorm"):
        check("--qk-clip", "--no-multi-latent-attention", "--qk-layernorm")
