"""Ring context-parallel attention (``--cp-comm-type p2p``): keys and values travel around the
CP ranks with point-to-point sends, each step's transfer hidden behind the previous block's
attention, and the blocks' outputs are merged by their log-sum-exp.

**Blocks.** CP rank ``r`` of ``n`` holds sequence chunks ``r`` and ``2n - 1 - r`` (the
load-balanced sharding of :mod:`megamoe.parallel.context_parallel`), ``c`` tokens each, for its
queries and for its keys and values. At step ``s`` it holds the keys and values of rank
``j = r - s (mod n)`` and computes one block of its attention:

- ``s = 0`` (its own): all its queries against all its keys, causal. Within the two chunks in
  this order the causal mask is the square lower triangle;
- ``j < r``: all its queries against chunk ``j`` only (chunk ``2n - 1 - j`` lies after both of
  its query chunks), no mask;
- ``j > r``: its late chunk ``2n - 1 - r`` against both of ``j``'s chunks (its early chunk ``r``
  precedes both), no mask.

So every block is either unmasked or a square causal block, and every rank does the same work
at every step: ``c x 2c`` or ``2c x c`` query-key pairs, ``(2c)^2 / 2`` at step 0.

**Merge.** Each block returns its output ``o_b`` and its rows' log-sum-exp ``lse_b``; the rows'
running output and log-sum-exp are merged as ``lse = log(e^lse + e^lse_b)``,
``o = o e^(lse_old - lse) + o_b e^(lse_b - lse)`` in float32 (float64 for float64 inputs).

**Backward** runs the ring again: each block's gradients come from the block kernel's backward
given the merged output and log-sum-exp (the softmax's global normalisation). The query
gradients stay on the rank; each key/value block's gradient accumulates (in float32) in a buffer
that follows the block around the ring and reaches the block's owner after the last step. The
next block's keys and values are received while the current one computes; the accumulators are
received while the next block computes.

**Kernels.** bf16 / fp16 on CUDA run each block on cuDNN's attention (what torch's SDPA picks
on Hopper; head sizes multiples of 8), or where that does not apply on torch's
FlashAttention-2 (the values zero-padded to the query/key head size when it differs, MLA's 128
vs 192), about half as fast: a CP=2 rank's blocks at 32k tokens, fwd + bwd, take 13.7 ms on
cuDNN against 25.4 ms on FlashAttention-2 at head size 128, and 24.0 against 44.1 ms for MLA,
where one GPU's whole causal sequence takes 27.2 and 37.4 ms (``tools/bench_cp.py --kernels``,
one H200). Other dtypes and devices run the same block in plain torch (scores, log-sum-exp and
their gradients written out): the float64 path the parity tests use.

**Cost per layer and rank** (forward): ``n - 1`` transfers of ``2c`` tokens' keys and values
(GQA: ``2 x kv_heads x head_dim`` values per token; MLA: its latent and rope key,
``kv_lora_rank + rope``, re-expanded block by block with ``wkv_b``: :class:`Latent`),
against one all-gather of ``(n - 1) / n`` of the sequence with ``--cp-comm-type allgather``;
backward moves the same keys and values again plus their float32 gradient accumulators. In
exchange, only two blocks of keys and values are in memory at a time, and every transfer can
overlap compute. Attention dropout is not supported on the ring (the config validation refuses
it): the models here train without it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megamoe.eager import eager_under_compile
from megamoe.kernels.max_logit import MaxLogitTracker
from megamoe.numerics import upcast_dtype
from megamoe.parallel.state import Group

_KV_TAG, _GRAD_TAG = 0, 1  # separate streams of messages between the same pair of ranks


def ring_block(step: int, rank: int, size: int, chunk: int) -> tuple[slice, slice, bool]:
    """Rows of this rank's queries, rows of the held keys/values, and whether the block is
    causal, at ``step`` of the ring (see the module docstring)."""
    everything = slice(0, 2 * chunk)
    if step == 0:
        return everything, everything, True
    source = (rank - step) % size
    if source < rank:
        return everything, slice(0, chunk), False
    return slice(chunk, 2 * chunk), everything, False


# ---------------------------------------------------------------------------------------------
# block kernels: [b, heads, s, d] in, output and log-sum-exp of the block's rows out


def _block_kernel(q: torch.Tensor, v: torch.Tensor) -> str:
    """cuDNN's attention where it applies (bf16/fp16 on CUDA, head sizes multiples of 8 up to
    256, its op passing the self-test below), else FlashAttention-2 (values no wider than the
    queries and keys: they are zero-padded to them), else the plain-torch block."""
    d, dv = q.shape[-1], v.shape[-1]
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return "math"
    if d % 8 == 0 and dv % 8 == 0 and max(d, dv) <= 256 and _cudnn_usable(q.device):
        return "cudnn"
    return "flash" if dv <= d <= 256 else "math"


_CUDNN_USABLE: dict = {}  # device -> whether cuDNN's attention with log-sum-exp passed its self-test


def _cudnn_usable(device: torch.device) -> bool:
    """cuDNN's attention (Hopper kernels: about 2x torch's FlashAttention-2 at these shapes,
    ``tools/bench_cp.py --kernels``) when this torch exposes it with its log-sum-exp and its
    backward accepts a given output and log-sum-exp: checked once per device on a small block
    against the plain-torch one; otherwise the blocks run on FlashAttention-2."""
    if device not in _CUDNN_USABLE:
        ok = hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        if ok:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                q, k = (torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
                v, dout = (torch.randn(1, 2, 128, 32, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
                out, lse, aux = _cudnn_forward(q, k, v, True, 0.125)
                got = _cudnn_backward(dout, q, k, v, out, lse, True, 0.125, aux)
                ref_out, ref_lse, _ = _block_forward(q, k, v, True, 0.125, kernel="math")
                ref = _block_backward(dout, q, k, v, ref_out, ref_lse, True, 0.125, None)
                ok = bool(torch.allclose(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
                          and torch.allclose(lse.float(), ref_lse.float(), atol=2e-2, rtol=2e-2)
                          and all(torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2) for a, b in zip(got, ref)))
            except (RuntimeError, TypeError, ValueError, NotImplementedError):  # an op this torch lacks or rejects
                ok = False
        _CUDNN_USABLE[device] = ok
    return _CUDNN_USABLE[device]


def _cudnn_forward(q, k, v, causal: bool, scale: float):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:-1]), ("cudnn", lse.shape, cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float, aux):
    _, lse_shape, cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.reshape(lse_shape).contiguous(), seed, offset, None,
        cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


def _causal_mask(rows: int, cols: int, device) -> torch.Tensor:
    return torch.ones(rows, cols, dtype=torch.bool, device=device).triu(1)


def _math_scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    acc = upcast_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(_causal_mask(scores.shape[-2], scores.shape[-1], q.device), float("-inf"))
    return scores


def _block_forward(q, k, v, causal: bool, scale: float, kernel: Optional[str] = None):
    """(output in q's dtype [b, h, sq, dv], lse float32/64 [b, h, sq], what the backward needs:
    None for the plain-torch block)."""
    kernel = kernel or _block_kernel(q, v)
    if kernel == "cudnn":
        return _cudnn_forward(q, k, v, causal, scale)
    if kernel == "flash":
        dv = v.shape[-1]
        if dv != q.shape[-1]:  # FlashAttention-2 needs equal head dims: MLA's v padded from 128 to 192
            v = torch.nn.functional.pad(v, (0, q.shape[-1] - dv))
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out[..., :dv], lse, ("flash", cum_q, cum_k, max_q, max_k, seed, offset)
    scores = _math_scores(q, k, causal, scale)
    lse = scores.logsumexp(-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.to(scores.dtype))
    return out.to(q.dtype), lse, None


def _block_backward(dout, q, k, v, out, lse, causal: bool, scale: float, aux):
    """(dq, dk, dv) of one block under the merged (global) ``out`` and ``lse``."""
    if aux is not None and aux[0] == "cudnn":
        return _cudnn_backward(dout, q, k, v, out, lse, causal, scale, aux)
    if aux is not None:
        dv_size, d = v.shape[-1], q.shape[-1]
        if dv_size != d:
            pad = (0, d - dv_size)
            v, out, dout = (torch.nn.functional.pad(t, pad) for t in (v, out, dout))
        _, cum_q, cum_k, max_q, max_k, seed, offset = aux
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), cum_q, cum_k, max_q, max_k, 0.0, causal,
            seed, offset, scale=scale)
        return dq, dk, dv[..., :dv_size]
    scores = _math_scores(q, k, causal, scale)
    probs = torch.exp(scores - lse[..., None])
    dout_, out_, v_, q_, k_ = (t.to(scores.dtype) for t in (dout, out, v, q, k))
    dv = torch.matmul(probs.transpose(-1, -2), dout_)
    dprobs = torch.matmul(dout_, v_.transpose(-1, -2))
    dscores = probs * (dprobs - (dout_ * out_).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, k_) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q_) * scale
    return dq, dk, dv


def merge_block(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold one block's rows (``out_b``, ``lse_b``) into the running ones, in place."""
    lse_new = torch.logaddexp(lse_acc, lse_b)
    out_acc.mul_(torch.exp(lse_acc - lse_new)[..., None])
    out_acc.add_(out_b.to(out_acc.dtype) * torch.exp(lse_b - lse_new)[..., None])
    lse_acc.copy_(lse_new)


# ---------------------------------------------------------------------------------------------
# the ring


class _Exchange:
    """Send ``tensors`` to the next rank of the ring and receive the same shapes from the
    previous one, asynchronously; ``wait()`` returns the received tensors."""

    def __init__(self, tensors: list[torch.Tensor], cp: Group, tag: int):
        nxt, prev = cp.ranks[(cp.rank + 1) % cp.size], cp.ranks[(cp.rank - 1) % cp.size]
        # both ends in the standard contiguous layout (the inputs are permuted views)
        self.sent = [t.contiguous() for t in tensors]  # kept alive until the sends complete
        self.received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, nxt, cp.process_group, tag) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, t, prev, cp.process_group, tag) for t in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        self.sent = None
        return self.received


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of ``_expand_heads``: the query heads of one key/value head summed."""
    if t.shape[1] == kv_heads:
        return t
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]


def _seq_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d]


class KeyValues:
    """What travels around the ring for GQA / MHA: each rank's keys and values themselves,
    ``[s, b, kv_heads, d]`` (sequence first, as every held tensor)."""

    def __init__(self, heads: int):
        self.heads = heads

    def expand(self, held, keys: slice, params):
        """The block's keys and values, ``[b, heads, s_keys, d]``, from the held tensors' rows."""
        return tuple(_expand_heads(_heads_first(t[keys]), self.heads) for t in held)

    def backward(self, held, keys: slice, params, dk, dv, param_grads):
        """The held tensors' gradients on rows ``keys`` from the block's key/value gradients."""
        return [_seq_first(_fold_heads(g, t.shape[2])) for g, t in zip((dk, dv), held)]


class Latent:
    """What travels around the ring for MLA: each rank's normalised latent ``[s, b, r]`` and
    rotated rope key ``[s, b, 1, rope]`` (``kv_lora_rank + rope`` values per token, against
    ``heads x (qk + v)`` for the expanded keys and values); every block re-expands them with
    ``project``, the ``wkv_b`` layer (called as a module, so its hooks and its GEMM backend,
    FP8 included, run), whose weight (``params[0]``, ``[heads x (nope + v), r]``, this rank's
    heads under TP) the backward differentiates in plain torch. That weight gradient accumulates
    over the blocks on this rank and is returned once (the data-parallel reduction over DP x CP
    sums the ranks' parts, as for every dense weight)."""

    def __init__(self, project, heads: int, nope_dim: int, v_dim: int):
        self.project, self.heads, self.nope_dim, self.v_dim = project, heads, nope_dim, v_dim

    def expand(self, held, keys: slice, params):
        latent, k_rope = held[0][keys], held[1][keys]
        s, b = latent.shape[0], latent.shape[1]
        kv = self.project(latent).view(s, b, self.heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(s, b, self.heads, k_rope.shape[-1])], dim=-1)
        return _heads_first(k), _heads_first(v)

    def backward(self, held, keys: slice, params, dk, dv, param_grads):
        latent, weight = held[0][keys], params[0]
        dk, dv = _seq_first(dk), _seq_first(dv)
        dk_nope, dk_rope = dk.split([self.nope_dim, dk.shape[-1] - self.nope_dim], dim=-1)
        dkv = torch.cat([dk_nope, dv], dim=-1).flatten(2).to(weight.dtype)  # [s, b, heads x (nope + v)]
        param_grads[0] += (dkv.flatten(0, 1).t() @ latent.flatten(0, 1).to(weight.dtype)).to(param_grads[0].dtype)
        return [dkv @ weight, dk_rope.sum(2, keepdim=True)]


class _RingAttention(torch.autograd.Function):
    """``apply(q, cp, scale, source, max_logits, num_held, *held, *params)``: ``q`` ``[b, heads,
    2c, d]``, ``held`` this rank's tensors that ``source`` turns into keys and values (sequence
    first), ``params`` the weights it uses (their gradients are returned); ``max_logits``: a
    tracker of each head's largest logit, or None."""

    @staticmethod
    def forward(ctx, q, cp: Group, scale: float, source, max_logits: Optional[MaxLogitTracker], num_held: int,
                *tensors):
        n, r, c = cp.size, cp.rank, q.shape[2] // 2
        held, params = tensors[:num_held], tensors[num_held:]
        acc = upcast_dtype(q.dtype)
        out = lse = None
        aux = []
        for step in range(n):
            incoming = _Exchange(list(held), cp, _KV_TAG) if step + 1 < n else None
            rows, keys, causal = ring_block(step, r, n, c)
            kb, vb = source.expand(held, keys, params)
            if out is None:
                out = q.new_zeros(*q.shape[:-1], vb.shape[-1], dtype=acc)
                lse = q.new_full(q.shape[:-1], float("-inf"), dtype=acc)
            out_b, lse_b, aux_b = _block_forward(q[:, :, rows], kb, vb, causal, scale)
            if max_logits is not None:
                max_logits.observe(q[:, :, rows], kb, scale, causal)
            merge_block(out[:, :, rows], lse[:, :, rows], out_b, lse_b)
            aux.append(aux_b)
            if incoming is not None:
                held = tuple(incoming.wait())
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse.float() if aux[0] is not None else lse, *tensors)
        ctx.cp, ctx.scale, ctx.source, ctx.num_held, ctx.aux = cp, scale, source, num_held, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *tensors = ctx.saved_tensors
        cp, scale, source = ctx.cp, ctx.scale, ctx.source
        n, r, c = cp.size, cp.rank, q.shape[2] // 2
        held, params = tuple(tensors[:ctx.num_held]), tensors[ctx.num_held:]
        acc = upcast_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        param_grads = [torch.zeros_like(p, dtype=acc) for p in params]
        grads_in = None
        for step in range(n):
            incoming = _Exchange(list(held), cp, _KV_TAG) if step + 1 < n else None
            rows, keys, causal = ring_block(step, r, n, c)
            kb, vb = source.expand(held, keys, params)
            dq_b, dk_b, dv_b = _block_backward(dout[:, :, rows], q[:, :, rows], kb, vb, out[:, :, rows],
                                               lse[:, :, rows], causal, scale, ctx.aux[step])
            dq[:, :, rows] += dq_b
            # the held block's gradients so far (from the ranks that held it before), plus this rank's part
            grads = [torch.zeros_like(t, dtype=acc) for t in held] if grads_in is None else grads_in.wait()
            for g, part in zip(grads, source.backward(held, keys, params, dk_b, dv_b, param_grads)):
                g[keys] += part.to(acc)
            grads_in = _Exchange(grads, cp, _GRAD_TAG)  # on to the next holder; the last send reaches the owner
            if incoming is not None:
                held = tuple(incoming.wait())
        grads = grads_in.wait()
        held_grads = [g.to(t.dtype) for g, t in zip(grads, tensors)]
        return (dq.to(q.dtype), None, None, None, None, None, *held_grads,
                *(g.to(p.dtype) for g, p in zip(param_grads, params)))


def _check_dropout(dropout_p: float) -> None:
    if dropout_p:
        raise ValueError("ring context-parallel attention (--cp-comm-type p2p) has no attention dropout: "
                         "set --attention-dropout 0 or use --cp-comm-type allgather")


@eager_under_compile  # point-to-point requests and their waits are not traceable: run eagerly
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: Group, softmax_scale: float,
                   dropout_p: float = 0.0, rng_tracker: Optional[object] = None,
                   max_logits: Optional[MaxLogitTracker] = None) -> torch.Tensor:
    """Causal attention of this rank's queries ``[s/cp, b, heads, d]`` (its two chunks) against
    the whole sequence, from this rank's own keys and values ``[s/cp, b, kv_heads, d]``.
    Returns ``[s/cp, b, heads * dv]``, as ``context_parallel_attention``."""
    _check_dropout(dropout_p)
    s, b = q.shape[0], q.shape[1]
    out = _RingAttention.apply(_heads_first(q), cp, softmax_scale, KeyValues(q.shape[2]), max_logits, 2, k, v)
    return _seq_first(out).reshape(s, b, -1)


@eager_under_compile
def latent_ring_attention(q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.nn.Module,
                          nope_dim: int, v_dim: int, cp: Group, softmax_scale: float, dropout_p: float = 0.0,
                          rng_tracker: Optional[object] = None,
                          max_logits: Optional[MaxLogitTracker] = None) -> torch.Tensor:
    """MLA's ring: queries ``[s/cp, b, heads, nope + rope]``, this rank's normalised latent
    ``[s/cp, b, r]`` and rotated rope key ``[s/cp, b, 1, rope]``; the keys and values are
    expanded with the ``wkv_b`` layer block by block (see :class:`Latent`). Returns
    ``[s/cp, b, heads * v]``."""
    _check_dropout(dropout_p)
    s, b, heads = q.shape[0], q.shape[1], q.shape[2]
    out = _RingAttention.apply(_heads_first(q), cp, softmax_scale, Latent(wkv_b, heads, nope_dim, v_dim), max_logits,
                               2, latent, k_rope, wkv_b.weight)
    return _seq_first(out).reshape(s, b, -1)
