#!/usr/bin/env python
"""Time one transformer block's forward, backward, input-gradient backward and deferred weight
gradients (W), as the zero-bubble schedules split them, on one GPU.

The block is a MoE layer of the DeepSeek-V2-Lite proxy (tools/bench_train.py's flags; others may
be added after ``--``), at its micro-batch. Rows (median of ``--iters`` CUDA-event timings):

- F: the block's forward;
- B, autograd: its whole backward with the native GEMMs (what 1F1B runs);
- B, deferrable GEMMs: the same with ``weight_grad.py``'s linear and grouped GEMMs, nothing
  deferred (their cost against autograd's);
- B input only, then W: the backward of a DualPipeV ``B`` with deferred weights, and its ``W``.

It then puts the measured times into the bubble formulas (deepseek-ai/DualPipe) for a model of
``2 pp`` such blocks: 1F1B, whose stage is 2 blocks, ``(pp - 1)(F + B)``; DualPipeV, whose chunk
is 1 block, ``(pp/2 - 1)(F&B + B - 3W)``, with ``F&B = F + B`` (no overlap of the pair yet).
These bubbles are modelled from one GPU's timings, not measured on a pipeline.

    python tools/bench_wgrad.py [--iters 10] [-- extra training flags]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_train import PROXY  # noqa: E402

from megamoe.cli import parse_config, split_at_double_dash  # noqa: E402
from megamoe.model.moe import MoELayer  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.parallel.weight_grad import WeightGradStore  # noqa: E402
from megamoe.training.train import build_model  # noqa: E402


def _timed(block, x, positions, iters: int, store, defer: bool) -> dict[str, float]:
    """Median ms of F, B and (when deferring) W over ``iters`` runs after 3 warm-up runs."""
    rows: dict[str, list[float]] = {"F": [], "B": [], "W": []}
    for i in range(iters + 3):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        out, stats = block(x, positions)
        loss = out.float().square().mean() + stats.aux_loss
        events[1].record()
        if store is None:
            loss.backward()
        else:
            with store.deferring(defer):
                loss.backward()
        events[2].record()
        if defer:
            store.run_next()
        events[3].record()
        torch.cuda.synchronize()
        for name, (a, b) in zip("FBW", zip(events, events[1:])):
            if i >= 3:
                rows[name].append(a.elapsed_time(b))
        for p in block.parameters():
            p.grad = None
    return {name: statistics.median(v) for name, v in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10)
    argv = sys.argv[1:]
    own, extra = split_at_double_dash(argv)
    args = parser.parse_args(own)
    config = parse_config([*PROXY, *extra], prog="bench_wgrad.py")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    model = build_model(config, ParallelState.single(), device)
    name, block = next((n, b) for n, b in model.layers.items() if isinstance(b.ffn, MoELayer))
    s, b, h = config.model.seq_length, config.training.micro_batch_size, config.model.hidden_size
    x = torch.randn(s, b, h, device=device, dtype=next(block.parameters()).dtype, requires_grad=True)
    positions = torch.arange(s, device=device)
    store = WeightGradStore()
    native = _timed(block, x, positions, args.iters, None, False)
    model.defer_weight_grads(store)
    whole = _timed(block, x, positions, args.iters, store, False)
    split = _timed(block, x, positions, args.iters, store, True)
    print(f"block {name} (MoE), {s} x {b} tokens, {torch.cuda.get_device_name()}, median of {args.iters}")
    print(f"{'':34}{'ms':>8}")
    for label, value in [("F", native["F"]), ("B, autograd", native["B"]), ("B, deferrable GEMMs", whole["B"]),
                         ("B input only (DualPipeV)", split["B"]), ("W (deferred weights)", split["W"])]:
        print(f"{label:34}{value:>8.2f}")
    f, bwd, w = native["F"], native["B"], split["W"]
    print("\nmodelled bubble per rank of a 2 x pp-block model (ms):")
    print(f"{'pp':>4}{'1F1B (pp-1)(F+B)':>20}{'DualPipeV (pp/2-1)(F&B+B-3W)':>32}")
    for pp in (4, 8, 16):
        one = (pp - 1) * 2 * (f + bwd)
        dual = (pp / 2 - 1) * ((f + bwd) + bwd - 3 * w)
        print(f"{pp:>4}{one:>20.1f}{dual:>32.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
