#!/usr/bin/env python
"""Benchmark one MoE layer of DeepSeek-V2-Lite shape, forward and backward, at EP = world size.

    python tools/bench_moe.py                                  # EP=1 on one GPU
    torchrun --nproc-per-node 2 tools/bench_moe.py             # EP=2 on two GPUs

Shape: hidden 2048, 64 routed experts (top-6, ffn 1408, softmax router), 2 shared experts
(ffn 2816), bf16, micro-batch 8 x seq 4096 = 32,768 tokens per rank, all-to-all dispatcher,
``torch._grouped_mm`` experts. Reports, as medians over ``--iters`` runs:

- forward stage split (each stage timed alone with CUDA events): routing, permutation,
  all-to-all (dispatch + combine exchanges, re-timed alone with the same split sizes),
  expert GEMMs, combine (un-permute and weighted sum);
- forward + backward of the whole layer with the shared-expert side-stream overlap on and off,
  the shared experts alone, and how much time the overlap saves;
- forward + backward with the tokens in ``--chunks`` chunks (``--moe-a2a-overlap-chunks``; shared
  overlap on): at EP > 1 the time saved against one chunk, as a share of the all-to-all time
  (4 exchanges), is the share of the all-to-all hidden; at EP 1 (no exchange) what chunking
  costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.config import ParallelConfig  # noqa: E402
from megamoe.model.experts import GroupedExperts  # noqa: E402
from megamoe.model.mlp import MLP  # noqa: E402
from megamoe.model.moe import MoELayer  # noqa: E402
from megamoe.model.router import TopKRouter  # noqa: E402
from megamoe.parallel import mappings  # noqa: E402
from megamoe.parallel.expert_parallel import AllToAllDispatcher  # noqa: E402
from megamoe.parallel.launch import init_distributed, process_info_from_env  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs (after it has run once)."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(state: ParallelState, device, args) -> MoELayer:
    E, ep = 64, state.ep.size
    kw = dict(device=device, dtype=torch.bfloat16)
    router = TopKRouter(2048, E, 6, "softmax", pre_softmax=True, load_balancing="seq_aux_loss",
                        aux_loss_coeff=1e-3, **kw)
    experts = GroupedExperts(E, E // ep, state.ep.rank * (E // ep), 2048, 1408, state.etp, backend=args.backend, **kw)
    shared = MLP(2048, 2816, state.tp, **kw)
    layer = MoELayer(router, experts, shared, AllToAllDispatcher(state.ep, state.etp, E), state.tp, state.dp)
    for i, (_, mod) in enumerate(layer.named_modules()):
        if hasattr(mod, "init_weights") and mod is not layer:
            mod.init_weights(torch.Generator(device=device).manual_seed(i + 100 * state.ep.rank))
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="torch", choices=["loop", "torch", "te"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[2, 4], help="Chunk counts to time.")
    parser.add_argument("--json", default=None, help="Write the results here (rank 0).")
    args = parser.parse_args()
    info = process_info_from_env()
    world, rank = info.world_size, info.rank
    state, device = init_distributed(
        ParallelConfig(expert_model_parallel_size=world, expert_tensor_parallel_size=1), info)
    layer = build(state, device, args)
    torch.manual_seed(rank)
    x = torch.randn(args.seq, args.batch, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def fwd_bwd():
        out, stats = layer(x)
        (out.float() * grad).sum().add(stats.aux_loss).backward()

    for _ in range(3):
        fwd_bwd()
    layer.shared_expert_overlap = True
    total_on = timed(fwd_bwd, args.iters)
    layer.shared_expert_overlap = False
    total_off = timed(fwd_bwd, args.iters)

    layer.shared_expert_overlap = True
    chunked = {}
    for num_chunks in args.chunks:
        layer.dispatcher.num_chunks = num_chunks
        chunked[num_chunks] = timed(fwd_bwd, args.iters)
    layer.dispatcher.num_chunks = 1

    def shared_only():
        layer.shared_experts(x).float().mul(grad).sum().backward()

    shared_ms = timed(shared_only, args.iters)

    # Forward stages, each timed alone.
    with torch.no_grad():
        x_TD = x.reshape(-1, 2048)
        routing = layer.route(x)
        rows, counts, handle = layer.dispatch(x_TD, routing)
        y = layer.experts(rows, counts)
        stage = {
            "routing": timed(lambda: layer.route(x), args.iters),
            "dispatch (permute + all-to-all)": timed(lambda: layer.dispatch(x_TD, routing), args.iters),
            "expert GEMMs": timed(lambda: layer.experts(rows, counts), args.iters),
            "combine (all-to-all + unpermute)": timed(lambda: layer.combine(y, handle, x.dtype), args.iters),
        }
        payload = torch.empty(sum(handle.ep_send), 2048, device=device, dtype=torch.bfloat16)
        a2a = timed(lambda: mappings.all_to_all(payload, state.ep, handle.ep_recv, handle.ep_send), args.iters)
    stage["of which all-to-all (each way)"] = a2a
    result = {
        "world": world, "tokens_per_rank": args.seq * args.batch, "backend": args.backend,
        "forward_stages_ms": stage,
        "fwd_bwd_ms_overlap_on": total_on, "fwd_bwd_ms_overlap_off": total_off,
        "shared_experts_fwd_bwd_ms": shared_ms, "overlap_saves_ms": total_off - total_on,
        "all_to_all_fwd_bwd_ms_estimate": 4 * a2a if world > 1 else 0.0,
        "fwd_bwd_ms_chunks": chunked,
    }
    if rank == 0:
        print(f"\nMoE layer, DeepSeek-V2-Lite shape, EP={world}, {args.seq * args.batch} tokens/rank, {args.backend}")
        for name, ms in stage.items():
            print(f"  forward {name:<34}{ms:8.2f} ms")
        print(f"  fwd+bwd, shared overlap on          {total_on:8.2f} ms")
        print(f"  fwd+bwd, shared overlap off         {total_off:8.2f} ms")
        print(f"  shared experts alone (fwd+bwd)      {shared_ms:8.2f} ms")
        print(f"  overlap saves                       {total_off - total_on:8.2f} ms")
        for num_chunks, ms in chunked.items():
            hidden = f", {100 * (total_on - ms) / (4 * a2a):.0f}% of the all-to-all hidden" if world > 1 else ""
            print(f"  fwd+bwd in {num_chunks} chunks                 {ms:8.2f} ms ({ms - total_on:+.2f}{hidden})")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
