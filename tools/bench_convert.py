#!/usr/bin/env python
"""Checkpoint conversion speed and peak memory: a synthetic Hugging Face directory (random
bf16 weights of a Mixtral-shaped model, written shard by shard), imported, then exported
back; each step runs in its own process, whose peak resident memory is reported beside the
plan ``--dry-run`` prints. The re-export is compared with the original, tensor by tensor.

    python tools/bench_convert.py --dir /local/bench      # about 2.5 GB of weights
    python tools/bench_convert.py --layers 2 --workers 2

Needs room for three copies of the weights in ``--dir``; everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megamoe.checkpoint.hf.config_map import values_to_config  # noqa: E402
from megamoe.checkpoint.hf.safetensors_io import pack_by_size, shard_names, write_index, write_shard  # noqa: E402
from megamoe.checkpoint.hf.tensor_map import tensor_maps  # noqa: E402
from megamoe.model.args import gpt_args  # noqa: E402


def _hf_config(layers: int) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
            "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "sliding_window": None, "torch_dtype": "bfloat16"}


def make_hf_dir(path: Path, layers: int, shard_bytes: int) -> int:
    """Random bf16 weights in HF's layout, one shard in memory at a time; returns the bytes."""
    from megamoe.checkpoint.hf.config_map import megamoe_values

    hf = _hf_config(layers)
    gpt = gpt_args(values_to_config(megamoe_values(hf)[1]))
    maps = tensor_maps(gpt, "mixtral", half_split_rope=True)
    def nbytes(m) -> int:
        return 2 * math.prod(m.shape)  # bf16

    groups = pack_by_size(maps, nbytes, shard_bytes)
    path.mkdir(parents=True)
    files = shard_names(len(groups))
    g = torch.Generator().manual_seed(0)
    for file, group in zip(files, groups):
        write_shard(str(path / file), {m.hf: (0.02 * torch.randn(m.shape, generator=g)).bfloat16() for m in group})
    total = sum(nbytes(m) for m in maps)
    write_index(str(path), [(f, [m.hf for m in grp]) for f, grp in zip(files, groups)], total)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return total


# runs the tool in a child that reports its own peak RSS (VmHWM, KB) as its last stderr line;
# not ru_maxrss, which Linux carries over fork and exec from this (larger) parent
_CHILD = ("import runpy, sys\n"
          "sys.argv = sys.argv[1:]\n"
          "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
          "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
          "    print('maxrss', hwm.split()[1], file=sys.stderr)\n")


def _timed(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GB of the conversion's process, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"convert_checkpoint.py {' '.join(args)} failed:\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return seconds, peak_kb / 1e6, proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/megamoe-bench-convert")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shard-gb", type=float, default=1.0)
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        start = time.perf_counter()
        total = make_hf_dir(root / "hf", args.layers, int(args.shard_gb * 1e9))
        print(f"synthetic Mixtral-shaped HF directory: {total / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
        w = ["--workers", str(args.workers)]
        plan = _timed(["import", "--hf-dir", str(root / "hf"), "--out", str(root / "mm"), "--dry-run", *w])[2]
        print("import plan:", plan.strip().splitlines()[-1])
        seconds, peak, _ = _timed(["import", "--hf-dir", str(root / "hf"), "--out", str(root / "mm"), *w])
        print(f"import: {seconds:.1f} s, {total / 1e9 / seconds:.2f} GB/s, peak RSS {peak:.2f} GB")
        plan = _timed(["export", "--load", str(root / "mm"), "--out", str(root / "back"), "--dry-run",
                       "--max-shard-size-gb", str(args.shard_gb), *w])[2]
        print("export plan:", plan.strip().splitlines()[-1])
        seconds, peak, _ = _timed(["export", "--load", str(root / "mm"), "--out", str(root / "back"),
                                       "--max-shard-size-gb", str(args.shard_gb), *w])
        print(f"export: {seconds:.1f} s, {total / 1e9 / seconds:.2f} GB/s, peak RSS {peak:.2f} GB")
        from safetensors import safe_open

        index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
        back = json.loads((root / "back" / "model.safetensors.index.json").read_text())["weight_map"] \
            if (root / "back" / "model.safetensors.index.json").exists() else None
        for name, file in index.items():
            a = safe_open(str(root / "hf" / file), "pt").get_tensor(name)
            b = safe_open(str(root / "back" / (back[name] if back else "model.safetensors")), "pt").get_tensor(name)
            if not torch.equal(a, b):
                sys.exit(f"{name} differs after import and export")
        print(f"re-export equals the original: {len(index)} tensors")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
