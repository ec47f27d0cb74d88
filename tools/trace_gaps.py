"""Where the GPU waits: the idle gaps of a torch profiler trace and what the host was doing.

    python tools/trace_gaps.py /tmp/prof/rank-0.json.gz --steps 3

Reads the Chrome trace that ``--profile`` writes (``--profile-dir``), merges every kernel, copy
and memset across streams into busy intervals, and prints the idle time between them: in total,
per step (``--steps``: how many steps the window holds), and the largest gaps, each with the
host call that launched the work after it (the innermost labelled region and CPU op around the launch) and any
synchronising runtime call (stream / device / event synchronise, a device-to-host copy) that
overlapped it. A gap whose next kernel started the moment it was launched is host-bound: the
GPU had run out of queued work. Gaps are also summed by that launching op, which names the
places worth making asynchronous.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_WORDS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent")


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def busy_intervals(gpu: list[dict]) -> list[tuple[float, float]]:
    """The union of the GPU events' [start, end) intervals, in order."""
    merged: list[list[float]] = []
    for e in sorted(gpu, key=lambda e: e["ts"]):
        start, end = e["ts"], e["ts"] + e["dur"]
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def innermost_op(ops_by_tid: dict, tid, ts: float) -> str:
    """The CPU op on thread ``tid`` that contains the instant ``ts`` and started last: the
    innermost, since a thread's ops nest. (``ops_by_tid``: each thread's ops and their sorted starts.)"""
    ops, op_starts = ops_by_tid.get(tid, ([], []))
    for i in range(bisect.bisect_right(op_starts, ts) - 1, -1, -1):
        if ops[i]["ts"] + ops[i]["dur"] >= ts:
            return ops[i]["name"]
    return "(no CPU op)"


def by_thread(events: list[dict], category: str) -> dict:
    """Each thread's events of ``category``, sorted by start, with their starts."""
    threads = defaultdict(list)
    for e in events:
        if e.get("cat") == category:
            threads[e["tid"]].append(e)
    return {tid: (sorted(es, key=lambda e: e["ts"]), sorted(e["ts"] for e in es)) for tid, es in threads.items()}


def analyse(events: list[dict], min_gap_us: float) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        raise SystemExit("no GPU events in this trace: was it a CUDA run with --profile?")
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launch_of = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    ops_by_tid, labels_by_tid = by_thread(events, "cpu_op"), by_thread(events, "user_annotation")
    syncs = sorted((e for e in runtime if any(w in e["name"] for w in SYNC_WORDS)), key=lambda e: e["ts"])
    sync_starts = [e["ts"] for e in syncs]
    gpu_by_start = sorted(gpu, key=lambda e: e["ts"])
    starts = [e["ts"] for e in gpu_by_start]

    busy = busy_intervals(gpu)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    gaps = []
    for (_, gap_start), (gap_end, _) in zip(busy[:-1], busy[1:]):
        if gap_end - gap_start < min_gap_us:
            continue
        after = gpu_by_start[bisect.bisect_left(starts, gap_end)]
        launch = launch_of.get(after.get("args", {}).get("correlation"))
        lag = after["ts"] - (launch["ts"] + launch["dur"]) if launch else None
        op = "(launch not in trace)"
        if launch:
            op = innermost_op(ops_by_tid, launch["tid"], launch["ts"])
            label = innermost_op(labels_by_tid, launch["tid"], launch["ts"])
            op = op if label == "(no CPU op)" else f"{label} / {op}"
        # the synchronising calls that started at most a second before the gap and before its end
        first, last = bisect.bisect_left(sync_starts, gap_start - 1e6), bisect.bisect_left(sync_starts, gap_end)
        overlapping = sorted({s["name"] for s in syncs[first:last] if s["ts"] + s["dur"] > gap_start})
        gaps.append({"us": gap_end - gap_start, "at_us": gap_start - busy[0][0], "next_kernel": after["name"],
                     "launched_by": op, "launch_to_start_us": lag, "syncs": overlapping})
    return {"span_us": span, "busy_us": busy_us, "gaps": gaps}


def report(result: dict, steps: int, top: int) -> str:
    span, busy = result["span_us"], result["busy_us"]
    idle = span - busy
    lines = [f"GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms "
             f"({100 * idle / span:.1f}%); per step: span {span / steps / 1e3:.2f}, idle {idle / steps / 1e3:.2f} ms"]
    gaps = result["gaps"]
    counted = sum(g["us"] for g in gaps)
    lines.append(f"{len(gaps)} gaps at or over the threshold hold {counted / 1e3:.2f} ms of the idle time")
    by_op = defaultdict(lambda: [0.0, 0])
    for g in gaps:
        key = g["launched_by"] + (" [after " + ", ".join(g["syncs"]) + "]" if g["syncs"] else "")
        by_op[key][0] += g["us"]
        by_op[key][1] += 1
    lines.append("\nidle per step by the host op that launched the next kernel (ms, gaps):")
    for key, (us, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / steps / 1e3:8.3f}  {n:5d}  {key[:150]}")
    lines.append("\nlargest gaps (ms at, ms long, launch-to-start us, next kernel, launched by, syncs):")
    for g in sorted(gaps, key=lambda g: -g["us"])[:top]:
        lag = "?" if g["launch_to_start_us"] is None else f"{g['launch_to_start_us']:.0f}"
        lines.append(f"  {g['at_us'] / 1e3:9.2f} {g['us'] / 1e3:7.3f} {lag:>7}  {g['next_kernel'][:60]:<60} "
                     f"{g['launched_by'][:50]}  {','.join(g['syncs'])}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a --profile trace (rank-N.json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="steps in the profiled window (per-step figures)")
    parser.add_argument("--min-gap-us", type=float, default=20.0, help="gaps shorter than this are not listed")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(report(analyse(load_events(args.trace), args.min_gap_us), args.steps, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
