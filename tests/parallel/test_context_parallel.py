"""Context parallel pieces against hand-computed values and plain attention: the load-balanced
shard indices, the all-gather back into sequence order, causal attention of a rank's two
chunks against the whole sequence (float64, gloo), gradients included, and the ring
(``--cp-comm-type p2p``): its block plan, its blocks and merge in one process (float64 on CPU,
flash blocks in bf16 on a GPU), the ring itself on gloo, and on threads under NCCL's matching
rules (gloo matches messages by tag, NCCL by posting order only: a ring whose ranks post the
key/value and gradient transfers in different orders passes on gloo and fails there)."""

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
from megamoe.parallel.ring_attention import (
    _block_backward,
    _block_forward,
    _expand_heads,
    _fold_heads,
    merge_block,
    ring_attention,
    ring_block,
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


def _inputs(S=16, B=2, H=4, KV=2, D=8, DV=8):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(S, B, H, D, dtype=DT, generator=g), torch.randn(S, B, KV, D, dtype=DT, generator=g)
    return [q, k, torch.randn(S, B, KV, DV, dtype=DT, generator=g), torch.randn(S, B, H * DV, dtype=DT, generator=g)]


def _cp_attention_on_rank(exchange: str, dv: int):
    """One rank's CP attention (``exchange``: 'allgather' or the ring, 'p2p') against the whole
    sequence's on one rank: outputs and gradients of this rank's q, k, v shards."""
    state = ParallelState.build(cp=dist.get_world_size())
    cp = state.cp
    q, k, v, grad_out = _inputs(DV=dv)
    scale = 0.3
    # reference: the whole sequence on one rank
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, scale)
    ref.backward(grad_out)
    mine = [shard_sequence(t, cp).clone().requires_grad_() for t in (q, k, v)]
    if exchange == "allgather":  # k and v gathered back into sequence order
        k_all, v_all = gather_sequence(mine[1], cp), gather_sequence(mine[2], cp)
        torch.testing.assert_close(k_all, k, rtol=0, atol=0)
        out = context_parallel_attention(mine[0], k_all, v_all, cp, scale)
    else:  # each rank's own keys and values, passed around the ring
        out = ring_attention(*mine, cp, scale)
    torch.testing.assert_close(out, shard_sequence(ref, cp), rtol=1e-12, atol=1e-12)
    out.backward(shard_sequence(grad_out, cp))
    for got, leaf in zip(mine, leaves):
        torch.testing.assert_close(got.grad, shard_sequence(leaf.grad, cp), rtol=1e-10, atol=1e-12)
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("exchange", ["allgather", "p2p"])
def test_context_parallel_attention_matches_whole_sequence_attention(workers, world, exchange):
    """GQA heads (4 query heads on 2 key/value heads), and MLA-like values narrower than the
    keys, float64, gloo."""
    assert all(workers(world).run(_cp_attention_on_rank, exchange, 8))
    assert all(workers(world).run(_cp_attention_on_rank, exchange, 6))


# ---------------------------------------------------------------------------------------------
# the ring (--cp-comm-type p2p)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_ring_blocks_cover_each_causal_pair_once(cp):
    """Over the ring's steps each rank's blocks cover exactly the causal (query, key) pairs of
    its queries, each once, and every block is unmasked or a square causal one."""
    c = 3
    S = 2 * cp * c
    for rank in range(cp):
        rows_pos = sequence_shard_indices(S, cp, rank)
        covered = torch.zeros(S, S, dtype=torch.int64)
        for step in range(cp):
            rows, keys, causal = ring_block(step, rank, cp, c)
            key_pos = sequence_shard_indices(S, cp, (rank - step) % cp)[keys]
            q_pos = rows_pos[rows]
            block = torch.ones(len(q_pos), len(key_pos), dtype=torch.int64)
            if causal:
                assert len(q_pos) == len(key_pos)
                block = block.tril()
            covered[q_pos[:, None], key_pos[None, :]] += block
        expected = torch.zeros(S, S, dtype=torch.int64)
        expected[rows_pos] = torch.ones(S, S, dtype=torch.int64).tril()[rows_pos]
        assert torch.equal(covered, expected), (cp, rank)


def _simulated_ring(q, k, v, cp, scale, kernel=None):
    """Every rank's ring in one process (no communication): the blocks, the merge and the
    backward with the merged output and log-sum-exp, as ``_RingAttention`` runs them. Returns
    (out, dq, dk, dv) in sequence order for the gradient ``dout`` = ones."""
    S, heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    c = S // (2 * cp)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    shard = [sequence_shard_indices(S, cp, r, q.device) for r in range(cp)]
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
    for r in range(cp):
        qr = q[:, :, shard[r]]
        o = qr.new_zeros(*qr.shape[:-1], v.shape[-1], dtype=acc)
        lse = qr.new_full(qr.shape[:-1], float("-inf"), dtype=acc)
        blocks = []
        for step in range(cp):
            rows, keys, causal = ring_block(step, r, cp, c)
            kv_pos = shard[(r - step) % cp][keys]
            kb, vb = (_expand_heads(t[:, :, kv_pos], heads) for t in (k, v))
            o_b, lse_b, aux = _block_forward(qr[:, :, rows], kb, vb, causal, scale, kernel)
            merge_block(o[:, :, rows], lse[:, :, rows], o_b, lse_b)
            blocks.append((rows, kv_pos, kb, vb, causal, aux))
        o = o.to(q.dtype)
        out[:, :, shard[r]] = o
        dout = torch.ones_like(o)
        for rows, kv_pos, kb, vb, causal, aux in blocks:
            lse_rows = lse[:, :, rows].float() if aux is not None else lse[:, :, rows]
            dq_b, dk_b, dv_b = _block_backward(dout[:, :, rows], qr[:, :, rows], kb, vb, o[:, :, rows], lse_rows,
                                               causal, scale, aux)
            dq[:, :, shard[r][rows]] += dq_b.to(acc)
            dk[:, :, kv_pos] += _fold_heads(dk_b.to(acc), kv_heads)
            dv[:, :, kv_pos] += _fold_heads(dv_b.to(acc), kv_heads)
    return out, dq, dk, dv


def _ring_case(device, dtype, dv=8, d=8):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 4, 24, d, dtype=dtype, device=device, generator=g)
    k = torch.randn(2, 2, 24, d, dtype=dtype, device=device, generator=g)
    v = torch.randn(2, 2, 24, dv, dtype=dtype, device=device, generator=g)
    leaves = [t.clone().float().requires_grad_() if dtype != DT else t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=0.3, enable_gqa=True)
    ref.sum().backward()
    return (q, k, v), ref, [t.grad for t in leaves]


@pytest.mark.parametrize("dv", [8, 6])
def test_ring_blocks_and_merge_match_whole_sequence_attention_float64(dv):
    (q, k, v), ref, grads = _ring_case("cpu", DT, dv)
    for cp in (2, 3):
        out, *got = _simulated_ring(q, k, v, cp, 0.3)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(got, grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dv", [16, 8])
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_ring_cuda_blocks_match_whole_sequence_attention_bf16(dv, kernel):
    """The CUDA path's blocks (cuDNN's attention, or FlashAttention-2), bf16, merged, against
    float32 attention of the whole sequence: within bf16's rounding of the inputs' products
    (2e-2). On Hopper cuDNN's op must pass the ring's self-test (it is the kernel used there)."""
    from megamoe.parallel.ring_attention import _cudnn_usable

    if kernel == "cudnn" and torch.cuda.get_device_capability() >= (9, 0):
        assert _cudnn_usable(torch.device("cuda", torch.cuda.current_device()))
    (q, k, v), ref, grads = _ring_case("cuda", torch.bfloat16, dv, d=16)
    out, *got = _simulated_ring(q, k, v, 2, 0.3, kernel)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(got, grads):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


class _NcclRules:
    """Point-to-point between threads with NCCL's matching: no tags; the i-th receive a rank
    posts from a peer takes the i-th send that peer posted to it (posting order, whatever the
    order of the waits); sends and receives are asynchronous and ``wait()`` blocks until the
    data is there. A ring whose ranks post their transfers in different orders receives the
    wrong tensor or waits forever."""

    def __init__(self, timeout: float = 20.0):
        import threading
        from collections import defaultdict

        self.cond = threading.Condition()
        self.sent = defaultdict(list)  # (sender, receiver) -> tensors in posting order
        self.received = defaultdict(int)  # (sender, receiver) -> receives posted so far
        self.timeout = timeout
        self.local = threading.local()
        self.isend, self.irecv = "isend", "irecv"  # the torch.distributed names ring_attention uses

    def P2POp(self, op, tensor, peer, group=None, tag=0):
        return (op, tensor, peer)

    def batch_isend_irecv(self, ops):
        me, requests = self.local.rank, []
        with self.cond:
            for op, tensor, peer in ops:
                if op == self.isend:
                    self.sent[(me, peer)].append(tensor.detach().clone())
                else:
                    requests.append(self._Request(self, tensor, (peer, me), self.received[(peer, me)]))
                    self.received[(peer, me)] += 1
            self.cond.notify_all()
        return requests

    class _Request:
        def __init__(self, hub, tensor, pair, index):
            self.hub, self.tensor, self.pair, self.index = hub, tensor, pair, index

        def wait(self):
            hub = self.hub
            with hub.cond:
                if not hub.cond.wait_for(lambda: len(hub.sent[self.pair]) > self.index, hub.timeout):
                    raise TimeoutError(f"rank {self.pair[1]} waits forever for rank {self.pair[0]} (deadlock)")
                data = hub.sent[self.pair][self.index]
            assert data.shape == self.tensor.shape and data.dtype == self.tensor.dtype, (data.shape, self.tensor.shape)
            self.tensor.copy_(data)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_ring_under_nccl_matching_rules_on_threads(monkeypatch, cp):
    """The ring's transfers (keys/values and gradient accumulators, between the same pairs) on
    threads with NCCL's rules: every rank's output and gradients match whole-sequence attention."""
    from megamoe.parallel import ring_attention as ring
    from megamoe.parallel.state import Group
    from megamoe.testing.distributed import run_on_threads

    hub = _NcclRules()
    monkeypatch.setattr(ring, "dist", hub)
    S = 4 * cp
    q, k, v, grad_out = _inputs(S=S, DV=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, 0.3)
    ref.backward(grad_out)
    def rank_main(rank):
        hub.local.rank = rank
        group = Group("cp", tuple(range(cp)), rank, None)
        idx = sequence_shard_indices(S, cp, rank)
        mine = [t[idx].clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*mine, group, 0.3)
        out.backward(grad_out[idx])
        return idx, out.detach(), [t.grad for t in mine]

    results = run_on_threads(rank_main, cp)
    assert all(len(sends) == hub.received[pair] for pair, sends in hub.sent.items()), "messages left unreceived"
    for idx, out, grads in results.values():
        torch.testing.assert_close(out, ref[idx], rtol=1e-12, atol=1e-12)
        for got, leaf in zip(grads, leaves):
            torch.testing.assert_close(got, leaf.grad[idx], rtol=1e-10, atol=1e-12)
