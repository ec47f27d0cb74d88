#!/usr/bin/env python
"""Activation memory per token, per part of each layer, measured: the ground truth the layout
planner's activation model is built against (issue 17).

One process, one rank (TP = PP = CP = EP = 1), the model built as training builds it. One
forward of one micro-batch with hooks at each block's start, its FFN's start and its end; then
the backward, whose peak is reported above what the forward left. On CUDA the counter is
``torch.cuda.memory_allocated``; on the CPU :class:`megamoe.testing.live_bytes.LiveBytes`
(slow at real widths, and the CPU's SDPA keeps its probability matrix, which flash attention
on a GPU does not: CPU figures of the attention part grow with the sequence).

    python tools/bench_activations.py -- --config examples/configs/deepseek_v2_lite.yaml --num-layers 4 \\
        --moe-layer-freq '[0]*1+[1]*3' --bf16 --seq-length 4096
    python tools/bench_activations.py --variants none moe full -- <flags>   # recompute settings

Prints, per variant: bytes per token of each block's attention half (norm included), FFN half,
and what the head added, the total kept after the forward, and the backward's peak above it.
Under full recompute a block keeps only its input, which its attention half then shows. Hooks
record the forward's first pass only (recompute runs them again in backward).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamoe.cli import parse_config, split_at_double_dash  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.random import model_parallel_seed  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.testing.live_bytes import LiveBytes  # noqa: E402
from megamoe.training.train import build_model  # noqa: E402

RECOMPUTE_FLAGS = {"none": [], "selective": ["--recompute-granularity", "selective"],
                   "moe": ["--moe-layer-recompute"], "full": ["--recompute-granularity", "full"]}


def measure(flags: list[str], device: torch.device) -> dict:
    config = parse_config(flags, prog="bench_activations.py")
    layout = validate(config, 1)
    state = ParallelState.without_process_groups(layout, 0)
    model = build_model(config, state, device)
    model.train()
    rng = model_parallel_seed(config.training.seed, state, device)
    mbs, seq = config.training.micro_batch_size, config.model.seq_length
    tokens = torch.randint(0, config.data.vocab_size, (mbs, seq), device=device)
    labels = torch.randint(0, config.data.vocab_size, (mbs, seq), device=device)
    live = LiveBytes() if device.type == "cpu" else None

    def now() -> int:
        return live.current if live is not None else torch.cuda.memory_allocated(device)

    marks: dict[str, int] = {}

    def mark(key: str) -> None:  # the forward's first pass only: recompute in backward runs the hooks again
        marks.setdefault(key, now())

    for name, block in model.layers.items():
        block.register_forward_pre_hook(lambda m, a, name=name: mark(f"{name}.start"))
        block.ffn_norm.register_forward_pre_hook(lambda m, a, name=name: mark(f"{name}.ffn"))
        block.register_forward_hook(lambda m, a, o, name=name: mark(f"{name}.end"))
    with live if live is not None else contextlib.nullcontext():
        base = now()
        out = model(tokens, labels, rng_tracker=rng)
        after_forward = now()
        if live is not None:
            live.reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(device)
        out.lm_loss_sum.backward()
        peak = live.peak if live is not None else torch.cuda.max_memory_allocated(device)
    tokens_per_mb = mbs * seq
    layers = {}
    for name in model.layers:
        start, ffn, end = marks[f"{name}.start"], marks[f"{name}.ffn"], marks[f"{name}.end"]
        layers[name] = ((ffn - start) / tokens_per_mb, (end - ffn) / tokens_per_mb)
    last_end = marks[f"{list(model.layers)[-1]}.end"]
    return dict(layers=layers, embed=(marks[f"{next(iter(model.layers))}.start"] - base) / tokens_per_mb,
                head=(after_forward - last_end), kept=after_forward - base, backward_peak=peak - after_forward,
                tokens=tokens_per_mb)


def main() -> int:
    argv = sys.argv[1:]
    own, flags = split_at_double_dash(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["none"], choices=list(RECOMPUTE_FLAGS))
    args = p.parse_args(own)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for variant in args.variants:
        r = measure(flags + RECOMPUTE_FLAGS[variant], device)
        print(f"recompute {variant}: {r['tokens']} tokens; kept after forward {r['kept'] / 2**20:.1f} MiB "
              f"({r['kept'] / r['tokens']:.0f} B/token); backward peak above that {r['backward_peak'] / 2**20:.1f} MiB; "
              f"embedding {r['embed']:.0f} B/token; head {r['head'] / 2**20:.1f} MiB")
        for name, (attn, ffn) in r["layers"].items():
            print(f"   layer {name}: attention half {attn:8.0f} B/token, FFN half {ffn:8.0f} B/token")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
