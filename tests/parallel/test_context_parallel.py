"""Context parallel pieces against hand-computed values and plain attention: the load-balanced
shard indices, the all-gather back into sequence order, and causal attention of a rank's two
chunks against the whole sequence (float64, gloo), gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.parallel.context_parallel import (
    context_parallel_attention,
    gather_sequence,
    sequence_shard_indices,
    shard_sequence,
)
from megamoe.parallel.state import ParallelState

DT = torch.float64


def test_shard_indices_are_load_balanced_and_cover_the_sequence():
    # 16 tokens, cp 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert sequence_shard_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert sequence_shard_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (1, 2, 4):
        shards = [sequence_shard_indices(32, cp, r) for r in range(cp)]
        assert sorted(torch.cat(shards).tolist()) == list(range(32))
        # causal work per rank (query-key pairs) is the same on every rank
        work = {int((idx + 1).sum()) for idx in shards}
        assert len(work) == 1, work
    with pytest.raises(ValueError, match="not divisible by 2 x the context-parallel size 4"):
        sequence_shard_indices(12, 4, 0)


def _reference(q, k, v, scale):
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=kh.shape[1] != qh.shape[1])
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _inputs(S=16, B=2, H=4, KV=2, D=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(S, B, h, D, dtype=DT, generator=g) for h in (H, KV, KV)] + [torch.randn(S, B, H * D, dtype=DT, generator=g)]


def _cp_attention_on_rank():
    state = ParallelState.build(cp=dist.get_world_size())
    cp = state.cp
    q, k, v, grad_out = _inputs()
    scale = 0.3
    # reference: the whole sequence on one rank
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, scale)
    ref.backward(grad_out)
    # this rank: its shard of q, k, v; k and v gathered back into sequence order
    mine = [shard_sequence(t, cp).clone().requires_grad_() for t in (q, k, v)]
    k_all, v_all = gather_sequence(mine[1], cp), gather_sequence(mine[2], cp)
    torch.testing.assert_close(k_all, k, rtol=0, atol=0)
    out = context_parallel_attention(mine[0], k_all, v_all, cp, scale)
    torch.testing.assert_close(out, shard_sequence(ref, cp), rtol=1e-12, atol=1e-12)
    out.backward(shard_sequence(grad_out, cp))
    for got, leaf in zip(mine, leaves):
        torch.testing.assert_close(got.grad, shard_sequence(leaf.grad, cp), rtol=1e-10, atol=1e-12)
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_matches_whole_sequence_attention(workers, world):
    assert all(workers(world).run(_cp_attention_on_rank))
