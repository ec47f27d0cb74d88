"""The router against hand-computed examples: every score function and option, the balancing
losses, the z-loss, the expert-bias update and capacity dropping.

The gate weight is the identity, so a token's logits are the token itself and each example's
expected numbers can be written out by hand (math module, not torch)."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.model.router import TopKRouter
from megamoe.parallel.state import ParallelState

SINGLE = ParallelState.single()


def router(E=4, K=2, **kw) -> TopKRouter:
    r = TopKRouter(E, E, K, dtype=torch.float64, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E, dtype=torch.float64))
    return r


def route(r, logits, num_seqs=1):
    x = torch.tensor(logits, dtype=torch.float64)
    return r(x, num_seqs, SINGLE.tp, None)


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def sigmoid(a):
    return 1 / (1 + math.exp(-a))


LOGITS = [[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, -2.0, 1.0]]


def test_softmax_topk_then_normalise():
    out = route(router(score_function="softmax"), LOGITS)
    assert out.experts_TK.tolist() == [[0, 1], [1, 3]]
    expected = [softmax([2.0, 1.0]), softmax([3.0, 1.0])]
    torch.testing.assert_close(out.probs_TK, torch.tensor(expected, dtype=torch.float64))


def test_softmax_pre_softmax_keeps_full_distribution():
    out = route(router(score_function="softmax", pre_softmax=True), LOGITS)
    p0, p1 = softmax(LOGITS[0]), softmax(LOGITS[1])
    torch.testing.assert_close(out.probs_TK, torch.tensor([[p0[0], p0[1]], [p1[1], p1[3]]], dtype=torch.float64))


def test_sigmoid_normalised_and_scaled():
    out = route(router(score_function="sigmoid", topk_scaling_factor=2.5), LOGITS)
    s = [sigmoid(2.0), sigmoid(1.0)]
    t = [sigmoid(3.0), sigmoid(1.0)]
    expected = [[2.5 * a / sum(s) for a in s], [2.5 * a / sum(t) for a in t]]
    torch.testing.assert_close(out.probs_TK, torch.tensor(expected, dtype=torch.float64))


def test_expert_bias_chooses_but_does_not_weight():
    r = router(score_function="sigmoid", enable_expert_bias=True)
    r.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    out = route(r, [LOGITS[0]])
    assert sorted(out.experts_TK[0].tolist()) == [0, 2]  # expert 2 only wins through its bias
    s = {0: sigmoid(2.0), 2: sigmoid(0.5)}
    got = dict(zip(out.experts_TK[0].tolist(), out.probs_TK[0].tolist()))
    for e in (0, 2):
        assert math.isclose(got[e], s[e] / (s[0] + s[2]), rel_tol=1e-12)


def test_group_limited_sigmoid_scores_groups_by_top2_sum():
    # 8 experts in 4 groups of 2; choose 2 groups, then top-2 experts inside them.
    logits = [[3.0, -5.0, 1.0, 1.0, 2.5, -9.0, 0.0, 0.0]]
    # group sums of sigmoids: g0 = s(3)+s(-5) = 0.959; g1 = 2 s(1) = 1.462; g2 = s(2.5)+s(-9) = 0.924; g3 = 1.0
    # best two groups: g1 and g3 -> experts {2, 3, 6, 7}; top-2 there: experts 2 and 3 (sigmoid(1) > sigmoid(0))
    out = route(router(E=8, K=2, score_function="sigmoid", num_groups=4, group_topk=2), logits)
    assert sorted(out.experts_TK[0].tolist()) == [2, 3]
    # without the group limit, experts 0 and 4 would win
    plain = route(router(E=8, K=2, score_function="sigmoid"), logits)
    assert sorted(plain.experts_TK[0].tolist()) == [0, 4]


def test_group_limited_softmax_scores_groups_by_max():
    logits = [[3.0, -5.0, 1.0, 1.0, 2.5, -9.0, 0.0, 0.0]]
    # group maxima: 3, 1, 2.5, 0 -> groups 0 and 2 -> experts {0, 1, 4, 5}; top-2: 0 and 4
    out = route(router(E=8, K=2, score_function="softmax", num_groups=4, group_topk=2), logits)
    assert sorted(out.experts_TK[0].tolist()) == [0, 4]


def test_aux_loss_switch_formula():
    r = router(score_function="softmax", load_balancing="aux_loss", aux_loss_coeff=0.01)
    out = route(r, LOGITS)
    # f_i = count_i / (T K); P_i = mean softmax; loss = coeff * E * sum f_i P_i
    T, K, E = 2, 2, 4
    counts = [1, 2, 0, 1]
    P = [(a + b) / T for a, b in zip(softmax(LOGITS[0]), softmax(LOGITS[1]))]
    expected = 0.01 * E * sum(c / (T * K) * p for c, p in zip(counts, P))
    assert math.isclose(out.aux_loss.item(), expected, rel_tol=1e-12)
    assert out.tokens_per_expert_E.tolist() == counts


def test_seq_aux_loss_per_sequence_then_mean():
    # 2 sequences of 2 tokens, tokens laid out [S, B] sequence-major: rows t = s*B + b.
    rows = [[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, -2.0, 1.0], [1.0, 1.5, 0.0, 2.0], [-1.0, 0.0, 2.0, 1.0]]
    r = router(score_function="sigmoid", load_balancing="seq_aux_loss", aux_loss_coeff=0.1)
    out = route(r, rows, num_seqs=2)
    E, K, S = 4, 2, 2
    losses = []
    for b in range(2):
        toks = [rows[s * 2 + b] for s in range(S)]
        chosen = [sorted(range(E), key=lambda e: -t[e])[:K] for t in toks]
        counts = [sum(e in c for c in chosen) for e in range(E)]
        norm = [[sigmoid(a) / sum(sigmoid(v) for v in t) for a in t] for t in toks]
        P = [sum(n[e] for n in norm) / S for e in range(E)]
        losses.append(sum(E / (K * S) * counts[e] * P[e] for e in range(E)))
    assert math.isclose(out.aux_loss.item(), 0.1 * sum(losses) / 2, rel_tol=1e-12)


def test_z_loss():
    r = router(score_function="softmax", z_loss_coeff=1e-3)
    out = route(r, LOGITS)
    lse = [math.log(sum(math.exp(a) for a in row)) for row in LOGITS]
    assert math.isclose(out.z_loss.item(), 1e-3 * sum(v * v for v in lse) / 2, rel_tol=1e-12)


def test_bias_update_sign_rule():
    r = router(enable_expert_bias=True, bias_update_rate=0.01)
    r.update_expert_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    torch.testing.assert_close(r.bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


@pytest.mark.parametrize("policy, kept", [
    # capacity = ceil(1.0 * 4 tokens * 1 / 2 experts) = 2 per expert; every token wants expert 0.
    ("probs", [False, True, True, False]),     # keep the two largest probabilities (tokens 1, 2)
    ("position", [True, True, False, False]),  # keep the two earliest tokens
])
def test_capacity_dropping(policy, kept):
    r = router(E=2, K=1, score_function="softmax", capacity_factor=1.0, drop_policy=policy)
    # tokens all prefer expert 0, with softmax top-1 weights 1.0 after renormalisation; use pre_softmax
    r.pre_softmax = True
    logits = [[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]]
    out = route(r, logits)
    assert out.capacity == 2
    assert out.kept_TK[:, 0].tolist() == kept
    assert out.num_dropped.item() == 2
    dropped = [i for i, k in enumerate(kept) if not k]
    assert all(out.probs_TK[i, 0].item() == 0.0 for i in dropped)


def test_capacity_ties_go_to_earlier_token():
    r = router(E=2, K=1, score_function="softmax", pre_softmax=True, capacity_factor=0.5, drop_policy="probs")
    out = route(r, [[1.0, 0.0]] * 4)  # identical tokens; capacity ceil(0.5*4/2) = 1
    assert out.kept_TK[:, 0].tolist() == [True, False, False, False]


def test_force_load_balancing_routes_on_noise_and_passes_gradients_through():
    # Every token's own logits prefer experts 0 and 1 by a wide margin; the forced router must
    # spread the 2 x 4000 assignments over all 8 experts, near 1000 each.
    E, T = 8, 4000
    r = router(E=E, K=2, score_function="softmax", random_logits=True)
    x = torch.zeros(T, E, dtype=torch.float64)
    x[:, :2] = 20.0
    x.requires_grad_()
    torch.manual_seed(0)
    out = r(x, 1, SINGLE.tp, None)
    counts = out.tokens_per_expert_E
    assert counts.sum() == 2 * T
    assert (counts - 2 * T / E).abs().max() < 0.1 * 2 * T / E  # binomial sd ~ 29, the bound is 250
    # the probabilities come from the noise: softmax over the noise logits, top-2 renormalised
    torch.manual_seed(0)
    noise = torch.randn(T, E, dtype=torch.float64)
    assert out.experts_TK.tolist() == noise.topk(2, dim=1).indices.tolist()
    torch.testing.assert_close(out.probs_TK, torch.softmax(noise.gather(1, out.experts_TK), dim=1))
    # straight through: d probs / d x is the softmax's Jacobian at the noise, applied to the real logits
    out.probs_TK[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
