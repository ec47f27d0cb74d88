#!/usr/bin/env python
"""Compare training runs from their metrics files (``--metrics-file``): the lm loss at a few
iterations and its relative difference to the first run, the median throughput after warm-up,
and the peak memory, as a Markdown table.

    python tools/compare_runs.py bf16=metrics_bf16.jsonl rowwise=metrics_rowwise.jsonl [--at 50 100 200]

The loss at an iteration is the mean over the 10 iterations ending there (single steps on mock
data move by about 0.5%); throughput is the median of ``tokens_per_s`` from iteration
``--warmup`` on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_at(rows: list[dict], iteration: int, window: int = 10) -> float:
    picked = [r["lm_loss"] for r in rows if iteration - window < r["iteration"] <= iteration]
    if not picked:
        raise SystemExit(f"no iterations up to {iteration} in a run of {rows[-1]['iteration'] if rows else 0}")
    return statistics.fmean(picked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=METRICS.jsonl; the first is the reference")
    parser.add_argument("--at", type=int, nargs="+", default=[50, 100, 150, 200])
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec}: expected NAME=METRICS.jsonl")
        runs.append((name, load(path)))
    ref = runs[0][1]
    head = " | ".join(f"loss @{i}" for i in args.at)
    print(f"| run | {head} | tokens/s | x {runs[0][0]} | peak GiB |")
    print("|---" * (len(args.at) + 4) + "|")
    ref_speed = statistics.median(r["tokens_per_s"] for r in ref if r["iteration"] >= args.warmup)
    for name, rows in runs:
        cells = []
        for i in args.at:
            loss, base = loss_at(rows, i), loss_at(ref, i)
            cells.append(f"{loss:.4f}" + ("" if rows is ref else f" ({(loss - base) / base:+.2%})"))
        speed = statistics.median(r["tokens_per_s"] for r in rows if r["iteration"] >= args.warmup)
        peak = max(r["max_memory_allocated_gib"] for r in rows)
        print(f"| {name} | {' | '.join(cells)} | {speed / 1e3:.1f}k | {speed / ref_speed:.2f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
