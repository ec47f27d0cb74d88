"""The growing global batch (``--step-batch-size-schedule``, ``--rampup-batch-size``) against
Megatron-LM's rules written out by hand: the batch of each step, the steps of a
``--train-samples`` run, the samples each rank reads, the learning rate's position, and a
resume in the middle of the ramp. (Its data-parallel parity: ``test_model_parallel_parity.py``.)"""

from __future__ import annotations

import random

import pytest
import torch

from megamoe.batch_schedule import BatchSchedule, parse_step_schedule, rampup_entries
from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.parallel.state import ParallelState
from megamoe.testing.presets import preset
from megamoe.training.schedule import learning_rate_at
from megamoe.training.train import MicroBatches


def test_step_schedule_reads_tokens_and_steps_at_the_batch_of_the_samples_before():
    """Thresholds are tokens (suffixes K, M, B, T) over the sequence length; a step runs at the
    batch of the samples consumed before it, so the step that crosses a threshold keeps the old
    size; --train-samples takes the steps Megatron's loop counts (while consumed < samples)."""
    assert parse_step_schedule("0:768 250B:1536, 500B:3072", 4096) == [
        (0, 768), (250 * 10 ** 9 // 4096, 1536), (500 * 10 ** 9 // 4096, 3072)]
    schedule = BatchSchedule(tuple(parse_step_schedule("0:4 100:8 200:16", 4)))  # at 0, 25, 50 samples
    consumed, batches = 0, []
    for _ in range(12):  # by hand: Megatron's update(consumed) before each step
        batch = 4 if consumed < 25 else 8 if consumed < 50 else 16
        batches.append(batch)
        assert schedule.batch_at(consumed) == batch
        consumed += batch
    assert [schedule.consumed_after(k) for k in range(13)] == [sum(batches[:k]) for k in range(13)]
    assert schedule.consumed_after(3, start=26) == 26 + 3 * 8
    for samples in (1, 25, 45, 100, 101, 400):
        steps, consumed = 0, 0
        while consumed < samples:
            consumed, steps = consumed + schedule.batch_at(consumed), steps + 1
        assert schedule.steps_for(samples) == steps, samples


def test_rampup_is_megatrons_old_ramp():
    """--rampup-batch-size 16 8 300000 towards 1024: Megatron-LM's former calculator, at every
    consumed count around each step and at random ones."""
    schedule = BatchSchedule(tuple(rampup_entries(16, 8, 300000, 1024)))
    per_increment = 300000 / ((1024 - 16) // 8)

    def megatron(consumed: int) -> int:
        return 1024 if consumed > 300000 else 16 + int(consumed / per_increment) * 8

    points = [int(k * per_increment) + d for k in range(127) for d in (-1, 0, 1)] + [299999, 300000, 300001]
    points += random.Random(0).sample(range(400000), 2000)
    assert all(schedule.batch_at(c) == megatron(c) for c in points if c >= 0)


def test_each_rank_reads_megatrons_samples(monkeypatch):
    """DP 2, micro-batch 1, batches of 4 then 8 sequences (64 tokens of 16 = 4 samples): step 0
    reads samples 0-3, step 1 samples 4-11; micro-step j gives rank d sample C + 2j + d."""
    cfg = preset("demo")
    cfg.model.seq_length, cfg.training.micro_batch_size = 16, 1
    cfg.training.step_batch_size_schedule, cfg.training.train_samples = "0:4 64:8", 12
    cfg.training.lr_warmup_iters = 0  # the preset's warmup is in iterations; this run counts samples
    layout = validate(cfg, 2)
    assert (cfg.training.global_batch_size, cfg.training.train_iters) == (8, 2)
    read = {}
    for rank in (0, 1):
        data = MicroBatches(cfg, ParallelState.without_process_groups(layout, rank), torch.device("cpu"))
        monkeypatch.setattr(data.data, "batch", lambda indices, device: indices)
        read[rank] = [[data.get(step, j) for j in range(data.num_micro_of(step))] for step in (0, 1)]
    assert read[0] == [[[0], [2]], [[4], [6], [8], [10]]]
    assert read[1] == [[[1], [3]], [[5], [7], [9], [11]]]


def _run_config(**ckpt):
    cfg = parse_config(["--mock-data", "--seq-length", "16", "--micro-batch-size", "2", "--train-samples", "40",
                        "--step-batch-size-schedule", "0:2 64:4 160:8", "--lr-warmup-samples", "6",
                        "--lr-decay-style", "linear", "--eval-iters", "0"])
    for k, v in ckpt.items():
        setattr(cfg.checkpoint, k, v)
    validate(cfg, 1)
    return cfg


def test_a_run_steps_logs_and_resumes_along_the_schedule(tmp_path):
    """The training loop: each step's batch, consumed samples and learning rate (the schedule's
    value at the samples of the steps before, by hand), and a run stopped at iteration 3, in
    the middle of the ramp, resumes to the uninterrupted run's losses bit for bit."""
    from megamoe.training.train import train

    cfg = _run_config()
    whole = train(cfg, ParallelState.single(), torch.device("cpu"))
    batches = [2, 2, 4, 4, 8, 8, 8, 8]  # thresholds at 4 and 10 samples; 40 samples after 8 steps
    assert [m.global_batch for m in whole] == batches
    assert [m.consumed_samples for m in whole] == [sum(batches[:k + 1]) for k in range(8)]
    assert [m.lr for m in whole] == [learning_rate_at(sum(batches[:k]), cfg.training) for k in range(8)]
    assert whole[1].lr == cfg.training.lr * 2 / 6  # warmup over 6 samples, 2 consumed before step 2

    train(_run_config(save=str(tmp_path), save_interval=3, exit_interval=3), ParallelState.single(),
          torch.device("cpu"))
    resumed = train(_run_config(load=str(tmp_path)), ParallelState.single(), torch.device("cpu"))
    assert [m.iteration for m in resumed] == list(range(4, 9))
    assert [(m.lm_loss, m.grad_norm, m.global_batch) for m in resumed] == [
        (m.lm_loss, m.grad_norm, m.global_batch) for m in whole[3:]]


@pytest.mark.parametrize("argv, world, message", [
    (["--step-batch-size-schedule", "0:4 64:8", "--global-batch-size", "8", "--train-samples", "12"], 1,
     "--step-batch-size-schedule '0:4 64:8' and --global-batch-size 8: give one"),
    (["--step-batch-size-schedule", "0:4 64:8"], 1, "--step-batch-size-schedule needs --train-samples"),
    (["--step-batch-size-schedule", "64:8", "--train-samples", "12"], 1, "the first threshold must be 0"),
    (["--step-batch-size-schedule", "0:4 64:x", "--train-samples", "12"], 1, "'64:x': THRESHOLD and BATCH_SIZE"),
    (["--step-batch-size-schedule", "0:4 64:6", "--train-samples", "12", "--micro-batch-size", "2"], 2,
     r"--global-batch-size 6 \(a --step-batch-size-schedule batch\) is not divisible"),
    (["--rampup-batch-size", "4", "5", "100", "--global-batch-size", "16", "--train-samples", "64"], 1,
     "minus START 4 must be a multiple of INCREMENT 5"),
    (["--rampup-batch-size", "2", "2", "100", "--global-batch-size", "8", "--train-samples", "64",
      "--micro-batch-size", "4"], 1, r"--global-batch-size 2 \(a --rampup-batch-size batch\) is not divisible"),
    (["--rampup-batch-size", "4", "4", "--train-samples", "64"], 1, "takes START INCREMENT SAMPLES"),
    (["--rampup-batch-size", "4", "4", "64", "--step-batch-size-schedule", "0:4", "--train-samples", "64"], 1,
     "--step-batch-size-schedule and --rampup-batch-size: give one"),
])
def test_bad_schedules_name_the_flag(argv, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--mock-data", "--seq-length", "16"] + argv), world)
