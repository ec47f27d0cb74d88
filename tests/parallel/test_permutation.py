"""Token permutation (parallel/permutation.py): the gathers against explicit loops and
numerical gradients (float64, CPU), and on CUDA the Triton kernels against the torch versions,
bit for bit from run to run."""

from __future__ import annotations

import pytest
import torch

from megamoe.parallel import permutation
from megamoe.parallel.permutation import combine_rows, count_per_expert, permute_tokens, row_of_pair

DT = torch.float64


def _routing(T=7, K=3, E=5, drop_every=4, pad=2, seed=0, device="cpu"):
    """Pairs sorted by expert with every ``drop_every``-th dropped, plus ``pad`` padding rows."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    kept = (torch.arange(T * K) % drop_every != 1).view(T, K)
    flat = experts.reshape(-1)
    pairs = [p for p in torch.sort(flat, stable=True).indices.tolist() if kept.reshape(-1)[p]]
    pair_of_row = torch.tensor(pairs + [T * K] * pad, device=device)  # padding rows point past the pairs
    probs = torch.rand(T, K, dtype=DT, generator=g).to(device)
    return pair_of_row, probs, T, K


def test_row_of_pair_inverts_pair_of_row():
    pair_of_row, _, T, K = _routing()
    rows = row_of_pair(pair_of_row, T * K)
    for n, p in enumerate(pair_of_row.tolist()):
        if p < T * K:
            assert rows[p] == n
    assert (rows == -1).sum() == T * K - (pair_of_row < T * K).sum()  # the dropped pairs


def test_permute_and_combine_against_loops_and_numerical_gradients():
    pair_of_row, probs, T, K = _routing()
    D = 4
    x = torch.randn(T, D, dtype=DT, requires_grad=True)
    real = pair_of_row[pair_of_row < T * K]
    row_TK = row_of_pair(real, T * K).view(T, K)
    rows = permute_tokens(x, real, row_TK)
    assert torch.equal(rows, x[real // K])
    # combine over rows that include padding (their outputs must not count)
    y = torch.randn(pair_of_row.numel(), D, dtype=DT, requires_grad=True)
    full_rows = row_of_pair(pair_of_row, T * K).view(T, K)
    out = combine_rows(y, probs, pair_of_row, full_rows)
    expected = torch.zeros(T, D, dtype=DT)
    for n, p in enumerate(pair_of_row.tolist()):
        if p < T * K:
            expected[p // K] += probs.view(-1)[p] * y[n]
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    probs = probs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y_, p_: combine_rows(y_, p_, pair_of_row, full_rows), (y, probs))
    assert torch.autograd.gradcheck(lambda x_: permute_tokens(x_, real, row_TK), (x,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or permutation.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_torch_and_repeat_exactly(dtype):
    T, K, E, D = 4096, 6, 64, 2048
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).cuda()
    pair_of_row = torch.sort(experts.reshape(-1), stable=True).indices
    pair_of_row = pair_of_row[pair_of_row % 7 != 3]  # some dropped pairs
    row_TK = row_of_pair(pair_of_row, T * K).view(T, K)
    probs = torch.rand(T, K, device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    grad = torch.randn(T, D, device="cuda", dtype=dtype)

    def run(use_triton: bool):
        saved = permutation.triton
        permutation.triton = saved if use_triton else None
        try:
            xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
            rows = permute_tokens(xi, pair_of_row, row_TK)
            out = combine_rows(rows * 2.0, pi, pair_of_row, row_TK)
            out.backward(grad)
            return rows.detach(), out.detach(), xi.grad, pi.grad
        finally:
            permutation.triton = saved

    triton_a, triton_b, torch_ref = run(True), run(True), run(False)
    for a, b in zip(triton_a, triton_b):
        assert torch.equal(a, b)  # no atomics: the same bits every run
    # the probabilities' gradients are dot products over D = 2048: summation order shows at 1e-4
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, r in zip(triton_a, torch_ref):
        torch.testing.assert_close(a.float(), r.float(), **tol)


def test_count_per_expert_matches_bincount():
    """The sync-free count equals torch.bincount, experts without pairs included."""
    expert = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(3))
    expert[expert == 4] = 5  # expert 4 gets nothing
    got = count_per_expert(expert, 9)
    assert torch.equal(got, torch.bincount(expert, minlength=9)) and got[4] == 0 and got.sum() == 500
