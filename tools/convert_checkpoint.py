#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megamoe (DeepSeek-V2/V3, Kimi K2, Mixtral, Qwen3-MoE).

    # HF -> megamoe: OUT/iter_0000000 (load with --load OUT or --finetune) and OUT/megamoe.yaml
    python tools/convert_checkpoint.py import --hf-dir /models/DeepSeek-V2-Lite --out /ckpt/v2lite
    torchrun --nproc-per-node 8 pretrain_moe.py --config /ckpt/v2lite/megamoe.yaml --load /ckpt/v2lite ...

    # megamoe -> HF (a checkpoint saved in any layout), then transformers' from_pretrained(OUT)
    python tools/convert_checkpoint.py export --load /ckpt/run --out /models/run-hf \\
        --tokenizer /models/DeepSeek-V2-Lite

Tensors stream one at a time (import) or one output shard at a time (export), over --workers
threads; --dry-run prints the mapping and the memory plan without writing. The output appears
only when complete (written as OUT.tmp, then renamed). A bad flag, an unsupported model, a
missing or mismatched tensor: one line on stderr naming it, and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.checkpoint.hf.convert import (DTYPES, export_hf, export_memory_bytes, import_hf,  # noqa: E402
                                           import_memory_bytes, plan_export, plan_import)
from megamoe.cli import _OneLineErrorParser, exit_on_config_error  # noqa: E402
from megamoe.progress import human_bytes  # noqa: E402

PROG = "convert_checkpoint.py"


def parse_args(argv):
    p = _OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> megamoe checkpoint", allow_abbrev=False)
    imp.add_argument("--hf-dir", required=True, help="config.json and *.safetensors (with the index if sharded)")
    imp.add_argument("--out", required=True, help="the megamoe checkpoint directory to create")
    imp.add_argument("--mtp-num-layers", type=int, default=0,
                     help="import this many of DeepSeek-V3's MTP layers (default 0: skip them)")
    imp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                     help="stored dtype (auto: the HF tensors', FP8 weights dequantized to bf16)")
    exp = sub.add_parser("export", help="megamoe checkpoint -> Hugging Face directory", allow_abbrev=False)
    exp.add_argument("--load", required=True, help="a megamoe checkpoint directory (or one iter_N directory in it)")
    exp.add_argument("--out", required=True, help="the Hugging Face directory to create")
    exp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the HF weights (default bf16)")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (default 5 GB)")
    exp.add_argument("--tokenizer", help="a directory whose tokenizer files are copied into the output")
    for sp in (imp, exp):
        sp.add_argument("--workers", type=int, default=4, help="threads reading and writing (default 4)")
        sp.add_argument("--dry-run", action="store_true", help="print the mapping and the memory plan, write nothing")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be at least 1")
    if args.direction == "import" and args.mtp_num_layers < 0:
        p.error(f"--mtp-num-layers {args.mtp_num_layers}: must be 0 or more")
    if args.direction == "export" and args.max_shard_size_gb <= 0:
        p.error(f"--max-shard-size-gb {args.max_shard_size_gb}: must be positive")
    return args


def _dry_run_import(args) -> None:
    plan = plan_import(args.hf_dir, args.mtp_num_layers)
    for m in plan.maps:
        where = "" if m.shape == m.global_shape else f" at {list(m.offsets)} of {list(m.global_shape)}"
        rope = " (RoPE rows half-split -> interleaved)" if m.rope else ""
        print(f"{m.hf} {list(m.shape)} -> {m.fqn}{where}{rope}")
    for name in plan.skipped:
        print(f"{name}: skipped")
    total = sum(plan.reader.nbytes(m.hf) for m in plan.maps)
    print(f"{plan.family}: {len(plan.maps)} tensors, {human_bytes(total)} read; peak memory about "
          f"{human_bytes(import_memory_bytes(plan, args.workers))} ({args.workers} writer threads, one 500 MB file and one tensor each; "
          "the page cache holds what was read)")


def _dry_run_export(args) -> None:
    plan = plan_export(args.load, DTYPES[args.dtype], int(args.max_shard_size_gb * 1e9))
    for i, shard in enumerate(plan.shards):
        for m in shard:
            where = "" if m.shape == m.global_shape else f"[{list(m.offsets)} +{list(m.box)}]"
            print(f"shard {i + 1}: {m.fqn}{where} -> {m.hf} {list(m.shape)}")
    total = sum(plan.nbytes(m) for shard in plan.shards for m in shard)
    print(f"{plan.family}: {sum(len(s) for s in plan.shards)} tensors in {len(plan.shards)} shards, {human_bytes(total)}; "
          f"peak memory about {human_bytes(export_memory_bytes(plan, args.workers))} ({args.workers} workers, one shard "
          "and one stored piece each)")


def main(argv=None) -> int:
    args = parse_args(argv)
    with exit_on_config_error(PROG):
        if args.direction == "import":
            if args.dry_run:
                _dry_run_import(args)
                return 0
            dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
            out = import_hf(args.hf_dir, args.out, args.mtp_num_layers, dtype, args.workers)
            print(f"{PROG}: wrote {out} (load it with --config {out}/megamoe.yaml --load {out})", file=sys.stderr)
        else:
            if args.dry_run:
                _dry_run_export(args)
                return 0
            out = export_hf(args.load, args.out, DTYPES[args.dtype], int(args.max_shard_size_gb * 1e9), args.workers,
                            args.tokenizer)
            print(f"{PROG}: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
