#!/usr/bin/env python
"""The memory-bound kernels around the FP8 experts on one GPU, at the V2-Lite proxy's shapes.

    python tools/bench_quantize.py

1. Rowwise quantization (``megamoe.kernels.fp8.quantize``) of 196,608 bf16 rows (32,768 tokens
   x top-6) at 2048, 2816 and 1408 columns: the row loop against whole-row tiles of several
   sizes and warp counts (``_TILE_*``), with a clone of the same tensor as the bandwidth
   ceiling. Every variant's output is checked equal to the first's.
2. The permutation's gathers (``megamoe.parallel.permutation``) at hidden 2048: their achieved
   bandwidth (bytes read and written once).
3. The routed experts' forward + backward under rowwise FP8 (``tools/bench_fp8.py``'s case)
   with the tiles on and off and the backward's dh handoff (``GradHandoff``) on and off.

Medians of CUDA-event timings (``tools/cuda_timing.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fp8  # noqa: E402
from cuda_timing import median_ms  # noqa: E402
from megamoe.kernels import fp8  # noqa: E402
from megamoe.model import experts as experts_module  # noqa: E402
from megamoe.parallel import permutation  # noqa: E402

TOKENS, TOPK, EXPERTS, HIDDEN = 32768, 6, 64, 2048
TILES = [(0, 0, 0), (8192, 4096, 4), (8192, 4096, 8), (8192, 8192, 8), (8192, 16384, 8)]  # (max C, values, warps)
DEFAULT_TILES = (fp8._TILE_MAX_C, fp8._TILE_ELEMENTS, fp8._TILE_WARPS)  # restored after each sweep


def set_tiles(tiles: tuple[int, int, int]) -> None:
    fp8._TILE_MAX_C, fp8._TILE_ELEMENTS, fp8._TILE_WARPS = tiles


def quantization() -> None:
    rows = TOKENS * TOPK
    for cols in (2048, 2816, 1408):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        clone = median_ms(lambda: x.clone(), 20)
        line = f"quantize {cols:>5} columns: clone {clone:.3f} ms ({rows * cols * 4 / clone / 1e6:.0f} GB/s) |"
        first = None
        for tiles in TILES:
            set_tiles(tiles)
            q, s = fp8.quantize(x, fp8.E4M3)
            if first is None:
                first = (q.view(torch.uint8).clone(), s.clone())
            elif not (torch.equal(q.view(torch.uint8), first[0]) and torch.equal(s, first[1])):
                raise SystemExit(f"tiles {tiles} quantize differently from the row loop")
            ms = median_ms(lambda: fp8.quantize(x, fp8.E4M3), 20)
            name = "loop" if tiles[0] == 0 else f"{tiles[1]}/{tiles[2]}w"
            line += f" {name} {ms:.3f} ({rows * cols * 3 / ms / 1e6:.0f} GB/s)"
        print(line, flush=True)
    set_tiles(DEFAULT_TILES)


def gathers() -> None:
    T, K, D = TOKENS, TOPK, HIDDEN
    experts = torch.rand(T, EXPERTS, device="cuda").argsort(dim=1)[:, :K]  # K distinct experts per token
    pair_of_row = torch.sort(experts.reshape(-1), stable=True).indices  # the rows: pairs by expert
    row_TK = permutation.row_of_pair(pair_of_row, T * K).view(T, K)
    token = permutation._token_of_row(pair_of_row, T, K)
    x, g = (torch.randn(T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    y = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(T, K, device="cuda")
    w_rows = probs.reshape(-1)[pair_of_row].contiguous()
    rows_bytes, sum_bytes = T * K * D * 2 * 2, T * K * D * 2 + T * D * 2
    cases = {"permute (forward)": (lambda: permutation._rows(x, token), rows_bytes),
             "combine (forward)": (lambda: permutation._gather_sum(y, row_TK, probs), sum_bytes),
             "combine backward: rows x probs": (lambda: permutation._rows(g, token, w_rows), rows_bytes),
             "combine backward: pair dots": (lambda: permutation._pair_dots(y, row_TK, g), sum_bytes),
             "permute backward": (lambda: permutation._gather_sum(y, row_TK), sum_bytes)}
    for name, (fn, nbytes) in cases.items():
        ms = median_ms(fn, 20)
        print(f"{name:<32}{ms:8.3f} ms {nbytes / ms / 1e6:7.0f} GB/s", flush=True)


def experts() -> None:
    recipe, handoff = fp8.Fp8Recipe("hybrid", "rowwise"), experts_module.GradHandoff
    for tiles in (DEFAULT_TILES, (0, 0, 0)):
        for with_handoff in (True, False):
            set_tiles(tiles)
            experts_module.GradHandoff = handoff if with_handoff else (lambda: None)
            _, _, fwd, fwd_bwd, _ = bench_fp8.measure(bench_fp8.experts_case, recipe, torch.device("cuda"), 20)
            print(f"experts rowwise, tiles {'on ' if tiles[0] else 'off'}, dh handoff {'on ' if with_handoff else 'off'}: "
                  f"forward {fwd:.3f} ms, forward + backward {fwd_bwd:.3f} ms", flush=True)
    experts_module.GradHandoff = handoff
    set_tiles(DEFAULT_TILES)


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    quantization()
    gathers()
    experts()
