#!/usr/bin/env python
"""Benchmark one attention layer under context parallelism: forward + backward time per layer
at CP = world size, against the same sequence on one GPU.

    python tools/bench_cp.py                                   # CP=1: the whole sequence on one GPU
    torchrun --nproc-per-node 2 tools/bench_cp.py              # CP=2

Layers: DeepSeek-V2-Lite MLA (hidden 2048, 16 heads, kv_lora 512, qk 128 + rope 64, v 128)
under ``--cp-comm-type allgather`` with the latent exchange (``mla-latent``) and the
expanded-KV exchange (``mla-expanded``), and under the ring, ``p2p``, passing the latent
(``mla-ring``) or the expanded keys and values (``mla-ring-expanded``); a GQA layer
(hidden 2048, 16 heads, 4 key/value heads, head dim 128) under both (``gqa``, ``gqa-ring``).
bf16, one sequence of ``--seq-length`` tokens. Prints the median over ``--iters`` runs, the
attention throughput (whole-sequence tokens per second, so CP=1 and CP=2 compare directly) and
the bytes each rank receives per layer in forward (the ring receives the same bytes as the
all-gather of the same keys and values, in ``CP - 1`` transfers overlapped with compute).

``--kernels`` (one GPU) also times the attention kernels alone, forward + backward, 16 heads:
a CP=2 rank's longest block under the all-gather (S/4 queries against S keys, causal aligned
bottom-right) against the whole-sequence causal square, the MLA block with and without padding
v to 192, and a CP=2 rank's ring blocks (a causal S/2 square and S/4 x S/2 unmasked, on the
ring's flash-attention blocks with their log-sum-exp merge and backward, no communication).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import median_ms  # noqa: E402
from megamoe.config import ParallelConfig  # noqa: E402
from megamoe.model.attention import GroupedQueryAttention  # noqa: E402
from megamoe.model.mla import MultiHeadLatentAttention  # noqa: E402
from megamoe.model.rope import RotaryEmbedding  # noqa: E402
from megamoe.parallel.context_parallel import sequence_shard_indices  # noqa: E402
from megamoe.parallel.launch import init_distributed, process_info_from_env  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402


def build(kind: str, state: ParallelState, seq: int, device):
    kw = dict(device=device, dtype=torch.bfloat16, cp=state.cp,
              cp_comm_type="p2p" if "-ring" in kind else "allgather")
    if kind.startswith("mla"):
        rope = RotaryEmbedding(64, seq, 10000.0, device=device)
        expanded = kind.endswith("expanded")
        layer = MultiHeadLatentAttention(2048, 16, None, 512, 128, 64, 128, rope, state.tp,
                                         cp_exchange="expanded" if expanded else "latent", **kw)
        per_token = 16 * (128 + 64 + 128) if expanded else (512 + 64)
    else:
        rope = RotaryEmbedding(128, seq, 10000.0, device=device)
        layer = GroupedQueryAttention(2048, 16, 4, 128, rope, state.tp, **kw)
        per_token = 2 * 4 * 128
    for module in layer.modules():
        init = getattr(module, "init_weights", None)
        if init is not None:
            init(torch.Generator(device=device).manual_seed(0))
    exchanged = (state.cp.size - 1) / state.cp.size * seq * per_token * 2 if state.cp.size > 1 else 0
    return layer, exchanged


def time_layer(layer, x, positions, iters: int) -> float:
    return median_ms(lambda: layer(x, positions).float().square().mean().backward(), iters)


def kernel_comparison(seq: int, iters: int, device) -> None:
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    def timed(q_len, k_len, dqk, dv, lower_right, pad_v=False) -> float:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for n, d in ((q_len, dqk), (k_len, dqk), (k_len, dv)))
        mask = causal_lower_right(q_len, k_len) if lower_right else None

        def run():
            vv = F.pad(v, (0, dqk - dv)) if pad_v else v
            out = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, is_causal=not lower_right)
            out[..., :dv].float().sum().backward()

        return median_ms(run, iters, warmup=2)

    from megamoe.parallel.ring_attention import _cudnn_usable

    cudnn = _cudnn_usable(torch.device(device))

    def ring_blocks(dqk, dv, kernel=None) -> float:
        """A CP=2 rank's ring compute: its causal square (both chunks) and its unmasked block
        (all queries against the other rank's first chunk, rank 1's case), merged, and both
        blocks' backward under the merged output."""
        from megamoe.parallel.ring_attention import _block_backward, _block_forward, merge_block

        c = seq // 4
        g = torch.Generator(device=device).manual_seed(0)
        q, k0, k1 = (torch.randn(1, 16, 2 * c, dqk, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        v0, v1 = (torch.randn(1, 16, 2 * c, dv, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        dout = torch.randn(1, 16, 2 * c, dv, device=device, dtype=torch.bfloat16, generator=g)
        blocks = ((k0, v0, True), (k1[:, :, :c], v1[:, :, :c], False))

        def run():
            out = q.new_zeros(1, 16, 2 * c, dv, dtype=torch.float32)
            lse = q.new_full((1, 16, 2 * c), float("-inf"), dtype=torch.float32)
            aux = []
            for k, v, causal in blocks:
                o, l, a = _block_forward(q, k, v, causal, 0.1, kernel)
                merge_block(out, lse, o, l)
                aux.append(a)
            out = out.to(q.dtype)
            for (k, v, causal), a in zip(blocks, aux):
                _block_backward(dout, q, k, v, out, lse, causal, 0.1, a)

        return median_ms(run, iters, warmup=2)

    rows = [
        ("causal square, S x S, d 128", timed(seq, seq, 128, 128, False)),
        ("bottom-right, S/4 x S, d 128", timed(seq // 4, seq, 128, 128, True)),
        ("causal square, S x S, MLA 192/128", timed(seq, seq, 192, 128, False)),
        ("bottom-right, S/4 x S, MLA 192/128", timed(seq // 4, seq, 192, 128, True)),
        ("bottom-right, S/4 x S, MLA, v padded", timed(seq // 4, seq, 192, 128, True, pad_v=True)),
        ("causal square, S x S, MLA, v padded", timed(seq, seq, 192, 128, False, pad_v=True)),
        ("ring blocks of a CP=2 rank, d 128, cuDNN", ring_blocks(128, 128, "cudnn") if cudnn else float("nan")),
        ("ring blocks of a CP=2 rank, MLA 192/128, cuDNN", ring_blocks(192, 128, "cudnn") if cudnn else float("nan")),
        ("ring blocks of a CP=2 rank, d 128, flash", ring_blocks(128, 128, "flash")),
        ("ring blocks of a CP=2 rank, MLA 192/128, flash", ring_blocks(192, 128, "flash")),
    ]
    print(f"\nattention kernels alone, S = {seq}, 16 heads, fwd+bwd; the ring's cuDNN self-test: "
          f"{'passed' if cudnn else 'failed'}")
    for name, ms in rows:
        print(f"{name:<40}{ms:>10.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernels", action="store_true", help="Also time the attention kernels alone.")
    args = parser.parse_args()
    info = process_info_from_env()
    world, rank = info.world_size, info.rank
    state, device = init_distributed(ParallelConfig(context_parallel_size=world), info)
    positions = sequence_shard_indices(args.seq_length, world, state.cp.rank, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(positions.numel(), 1, 2048, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    if rank == 0:
        print(f"CP={world}, sequence {args.seq_length} tokens ({positions.numel()} per rank), bf16, fwd+bwd, "
              f"median of {args.iters}")
        print(f"{'layer':<14}{'ms / layer':>12}{'tokens/s':>14}{'MB received per rank':>22}")
    for kind in ("mla-latent", "mla-expanded", "mla-ring", "mla-ring-expanded", "gqa", "gqa-ring"):
        layer, exchanged = build(kind, state, args.seq_length, device)
        ms = time_layer(layer, x, positions, args.iters)
        if rank == 0:
            print(f"{kind:<14}{ms:>12.2f}{args.seq_length / ms * 1e3:>14,.0f}{exchanged / 1e6:>22.1f}", flush=True)
        del layer
        x.grad = None
    if args.kernels and rank == 0:
        kernel_comparison(args.seq_length, args.iters, device)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
