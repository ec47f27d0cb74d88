"""The memory planner's training-state bytes against the tensors training allocates, in
several layouts (gloo), and its per-stage view of a published layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.cli import parse_config
from megamoe.config_validation import validate
from megamoe.parallel.state import ParallelLayout, ParallelState
from megamoe.training.memory_plan import stage_ranks, state_bytes
from megamoe.testing.ranks import training_rank
from megamoe.testing.scripts import run_script

BASE = ["--config", "examples/configs/demo.yaml", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "8"]


def _allocated_and_predicted(flags: list[str]) -> tuple[dict, dict]:
    """After one training step (Adam allocates its moments then): what the optimizer holds, and
    what the planner predicts for this rank from the layout alone."""
    rank = training_rank(flags)
    rank.step()
    return rank.optimizer.memory_bytes(), state_bytes(rank.config, rank.planning_state).as_dict()


LAYOUTS = {
    "bf16": (1, ["--bf16"]),
    "fp32": (1, []),
    "tp2,distopt,bf16-moments": (2, ["--bf16", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     "--use-distributed-optimizer", "--use-precision-aware-optimizer",
                                     "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]),
    "pp2,ep2,distopt": (4, ["--bf16", "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                            "--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer"]),
    "dp4,distopt,small-buckets": (4, ["--bf16", "--use-distributed-optimizer", "--ddp-bucket-size", "5000"]),
    "muon,tp2,ep2": (4, ["--bf16", "--optimizer", "muon", "--tensor-model-parallel-size", "2",
                         "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "muon,tp2,ep2,distopt": (4, ["--bf16", "--optimizer", "muon", "--tensor-model-parallel-size", "2",
                                 "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                                 "--use-distributed-optimizer", "--ddp-bucket-size", "5000"]),
    "ep4,etp1,tp2,bf16-second-moment": (4, ["--bf16", "--tensor-model-parallel-size", "2",
                                            "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1",
                                            "--moe-token-dispatcher-type", "alltoall",
                                            "--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "bf16"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predicted_state_bytes_are_the_allocated_bytes(workers, layout):
    world, flags = LAYOUTS[layout]
    results = [_allocated_and_predicted(BASE + flags)] if world == 1 else workers(world).run(
        _allocated_and_predicted, BASE + flags)
    for rank, (allocated, predicted) in enumerate(results):
        assert predicted == allocated, (rank, predicted, allocated)


def test_stages_of_deepseek_v3_on_2048_gpus():
    config = parse_config(["--config", "examples/configs/deepseek_v3.yaml", "--bf16", "--pipeline-model-parallel-size",
                           "16", "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "2",
                           "--expert-model-parallel-size", "64", "--use-distributed-optimizer"])
    layout = validate(config, 2048)
    ranks = stage_ranks(layout)
    assert len(ranks) == 16 and [layout.coords(r)["pp"] for r in ranks] == list(range(16))
    stages = [state_bytes(config, ParallelState.without_process_groups(layout, r)) for r in ranks]
    # every decoder layer but the first three is MoE: a middle stage holds 4 MoE layers of 256 / 64
    # experts of 3 x 7168 x 2048 weights, plus attention and shared experts
    experts_per_stage = 4 * (256 // 64) * 3 * 7168 * 2048
    assert stages[5].num_expert_params == experts_per_stage
    # bf16 weights (2 bytes) and float32 main gradients (4) for every parameter, and 12 bytes of
    # masters + moments spread over DP 128 (dense) or expert-DP 2
    middle = stages[5]
    dense = middle.num_params - middle.num_expert_params
    expected_optimizer = 12 * (dense / 128 + middle.num_expert_params / 2)
    assert abs((middle.masters + middle.adam_states) - expected_optimizer) < 1e-3 * expected_optimizer
    assert middle.params >= 2 * middle.num_params and middle.main_grads >= 4 * middle.num_params
    assert isinstance(layout, ParallelLayout)


def test_the_planner_prints_each_stage_and_refuses_bad_layouts_in_one_line():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MEGAMOE_DRY_RUN": "check", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "examples/train_mixtral_8x7b.sh"], cwd=root, capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]  # PP 4
    assert "across nodes: dp 8 over 2 nodes" in run.stdout
    tool = ["tools/plan_layout.py", "--nnodes", "1", "--gpus-per-node", "8", "--"]
    too_big = run_script(*tool[:-1], "--gpu-memory-gib", "80", "--", "--config", "examples/configs/mixtral_8x7b.yaml",
                         "--bf16", "--expert-model-parallel-size", "8", cwd=root, timeout=120)
    # 46.7B parameters on 8 GPUs without the distributed optimizer: 18 bytes each of whole-model
    # dense state plus one eighth of the experts' exceeds 80 GiB
    assert too_big.returncode == 1 and "exceeds --gpu-memory-gib 80" in too_big.stderr
    bad = run_script(*tool, "--config", "examples/configs/mixtral_8x7b.yaml", "--expert-model-parallel-size", "3",
                     cwd=root, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--expert-model-parallel-size 3" in bad.stderr
