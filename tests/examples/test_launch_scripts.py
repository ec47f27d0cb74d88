"""The multi-node launch scripts of ``examples/``: their layouts validated for their world sizes,
one of them run as two "nodes" on this machine (two torchrun launches meeting at a localhost
c10d rendezvous) that trains, saves and resumes, and the SLURM script driven by a fake ``srun``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {  # script -> (nodes, the groups the layout must keep inside a node)
    "train_deepseek_v2_lite.sh": (1, "ep 8, dp 8"),
    "train_deepseek_v3.sh": (256, "nothing"),
    "train_kimi_k2.sh": (256, "nothing"),
    "train_mixtral_8x7b.sh": (8, "tp 2, ep 8"),
    "train_qwen3_30b_a3b.sh": (2, "ep 8, dp 8"),
}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOE_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_launch_script_is_valid_for_its_world(script):
    nodes, inside = SCRIPTS[script]
    proc = subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(MEGAMOE_DRY_RUN="check"))
    assert proc.returncode == 0, proc.stderr
    assert f"topology: {nodes} node(s) x 8 GPUs; inside a node: {inside};" in proc.stdout, proc.stdout


def test_a_layout_that_does_not_fit_the_world_is_one_line(tmp_path):
    proc = subprocess.run(["bash", "examples/train_mixtral_8x7b.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env(MEGAMOE_DRY_RUN="check", NNODES="3"))
    assert proc.returncode == 2
    error = proc.stderr.splitlines()[-1]
    assert error.startswith("plan_layout.py: error: --expert-tensor-parallel-size 1 x --expert-model-parallel-size 8")
    assert "(world size 24 / --pipeline-model-parallel-size 4)" in error and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Qwen3-30B-A3B's script at toy size: the tiny preset of its family, one "GPU" (CPU rank) per node
TINY = ["--config", "examples/configs/tiny_qwen3_moe.yaml", "--expert-model-parallel-size", "1", "--no-bf16",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2", "--eval-iters", "0",
        "--save-interval", "2", "--log-interval", "1", "--lr-warmup-iters", "0"]


def _two_nodes(tmp_path: Path, iters: int) -> list[str]:
    """Both nodes' output, launched as SLURM or a user would: the same script, NODE_RANK 0 and 1."""
    env = _env(GPUS_PER_NODE="1", NNODES="2", MASTER_ADDR="localhost", MASTER_PORT=str(_free_port()),
               CHECKPOINT_DIR=str(tmp_path / "ckpt"), RUN_ID=f"test-{iters}")
    nodes = [subprocess.Popen(["bash", "examples/train_qwen3_30b_a3b.sh", *TINY, "--train-iters", str(iters)],
                              cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-3000:]
    return outs


def test_a_script_trains_as_two_nodes_and_a_second_launch_resumes(tmp_path):
    first = "\n".join(_two_nodes(tmp_path, 2))
    assert "topology: 2 node(s) x 1 GPUs; inside a node: nothing; across nodes: pp 2 over 2 nodes" in first
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    second = "\n".join(_two_nodes(tmp_path, 4))
    assert "loaded" in second and "of iteration 2 from" in second
    assert re.search(r"iteration\s+4/\s*4", second), second[-2000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"


# ---------------------------------------------------------------------------------------------
# SLURM, with a fake srun and scontrol


FAKE_SRUN = """#!/usr/bin/env bash
# records its arguments, then runs the step as each node would, with the launch printed, not run
echo "srun $*" >> "$RECORD"
while [[ "$1" == --* ]]; do shift; [[ "$1" != --* && "$1" != bash ]] && shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node MEGAMOE_DRY_RUN=1 "$@" >> "$RECORD" 2>/dev/null
done
[ -n "${FAKE_SRUN_SLEEP:-}" ] && exec sleep "$FAKE_SRUN_SLEEP"
exit 0
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$RECORD"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a17\\ngpu-a18\\n'
exit 0
"""


def _sbatch(tmp_path: Path, **extra) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(tmp_path / "record"), SLURM_JOB_ID="4242",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_RESTART_COUNT="1", CHECKPOINT_DIR="/ckpt/v3", **extra)
    return subprocess.Popen(["bash", str(ROOT / "examples/slurm/train.sbatch"), str(ROOT / "examples/train_deepseek_v3.sh"),
                             "--train-iters", "123"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_the_slurm_script_starts_one_torchrun_per_node(tmp_path):
    job = _sbatch(tmp_path)
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 0, out
    record = (tmp_path / "record").read_text()
    assert "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1" in record
    launches = [line for line in record.splitlines() if "torch.distributed.run" in line]
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert f"--nnodes 2 --nproc-per-node 8 --node-rank {rank} --rdzv-backend c10d" in line
        assert "--rdzv-endpoint gpu-a17:24242 --rdzv-id megamoe-4242-1" in line  # port 20000 + job id
        assert "--save /ckpt/v3 --load /ckpt/v3" in line and "--exit-signal-handler" in line
        assert line.rstrip().endswith("--train-iters 123")  # extra flags come last and win
    assert (tmp_path / "logs").is_dir() and "requeue" not in record


def test_the_slurm_script_requeues_on_sigterm(tmp_path):
    job = _sbatch(tmp_path, FAKE_SRUN_SLEEP="60")
    deadline = time.monotonic() + 30
    while "torch.distributed.run" not in ((tmp_path / "record").read_text() if (tmp_path / "record").exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)
    job.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM before the time limit, or preemption
    out = job.communicate(timeout=30)[0]
    assert job.returncode == 0, out
    assert "scontrol requeue 4242" in (tmp_path / "record").read_text()
    assert "SIGTERM: the step saves and stops" in out
