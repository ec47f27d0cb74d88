"""Loss scaling and the precision policy (megamoe/training/loss_scale.py, megamoe/precision.py).

- The dynamic scale follows Megatron-LM's rules, checked against a sequence worked out by hand;
  a fixed --loss-scale never moves.
- The flags build what Megatron-LM builds (dynamic with --fp16 at its defaults, fixed with
  --loss-scale, none for bf16); bad values are one-line errors naming the flag.
- Exactness: training the float64 model with a power-of-two loss scale gives bitwise the
  losses, grad norms and weights of the unscaled run, with and without a clip.
- The same under PP 2, where every stage scales its own balancing losses.
- An overflowed step is skipped: the weights, the expert biases and Adam's step count stay as
  they were, the scale backs off, the learning-rate schedule does not advance, the log says so.
- Without a loss scale or the NaN check, a step whose grad norm is not finite is skipped too.
- The scale and its counters are saved in the checkpoint and restored.
- An fp16 run from 2**32 skips its first steps as the scale falls, then trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.parallel.state import ParallelState
from megamoe.precision import PrecisionPolicy
from megamoe.testing.parity import build, make_config
from megamoe.testing.scripts import run_script
from megamoe.training.checkpoint import load_checkpoint, save_checkpoint
from megamoe.training.loss_scale import LossScaler, build_loss_scaler
from megamoe.training.train import MicroBatches, build_optimizer, train_step

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_the_dynamic_scale_follows_megatrons_rules_by_hand():
    s = LossScaler(scale=16.0, min_scale=2.0, window=3, hysteresis=2, hysteresis_tracker=2)
    # overflow: tolerated once (hysteresis 2), then halved; every further overflow halves until a
    # whole window passes cleanly, which doubles the scale and refills the hysteresis
    events = [True, True, True, False, False, True, True, False, False, False, True, True]
    want = [16, 8, 4, 4, 4, 2, 2, 2, 2, 4, 4, 2]
    got = []
    for overflowed in events:
        s.update(overflowed)
        got.append(s.scale)
    assert got == want
    assert s.skipped == sum(events)


def test_a_fixed_loss_scale_never_moves():
    s = LossScaler(scale=1024.0, dynamic=False)
    for overflowed in (True, False, True):
        s.update(overflowed)
    assert s.scale == 1024.0 and s.skipped == 2


def _config(*flags):
    cfg = parse_config(["--config", str(ROOT / "examples/configs/demo.yaml"), *flags])
    validate(cfg, 1)
    return cfg


def test_the_flags_build_megatrons_scalers():
    fp16 = build_loss_scaler(_config("--fp16").training)
    assert (fp16.dynamic, fp16.scale, fp16.min_scale, fp16.window, fp16.hysteresis, fp16.hysteresis_tracker) == (
        True, 2.0 ** 32, 1.0, 1000, 2, 2)
    fixed = build_loss_scaler(_config("--bf16", "--loss-scale", "128").training)
    assert (fixed.dynamic, fixed.scale) == (False, 128.0)
    assert build_loss_scaler(_config("--bf16").training) is None
    policy = PrecisionPolicy.from_config(_config("--fp16"))
    assert policy.params_dtype == torch.float16 and policy.half and policy.counts_toward_mfu()
    assert PrecisionPolicy.from_config(_config()).params_dtype == torch.float32


@pytest.mark.parametrize("flags, message", [
    (["--loss-scale", "8"], "--loss-scale 8.0: needs --fp16 or --bf16"),
    (["--fp16", "--hysteresis", "0"], "--hysteresis 0: must be at least 1"),
    (["--fp16", "--loss-scale-window", "0"], "--loss-scale-window 0: must be at least 1"),
    (["--fp16", "--min-loss-scale", "64", "--initial-loss-scale", "32"], "--min-loss-scale 64.0 is above"),
    (["--fp16", "--initial-loss-scale", "-1"], "--initial-loss-scale -1.0: must be positive"),
    (["--fp16", "--bf16"], "--bf16 and --fp16 cannot both be set"),
    (["--bf16", "--fp8-recipe", "mxfp8", "--fp8-format", "e4m3"], "mxfp8 needs Blackwell"),
])
def test_bad_precision_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        _config(*flags)


def _train(loss_scaler, clip=0.0, steps=3, poison_step=None, check_nan=True):
    """The float64 model for ``steps`` steps with ``loss_scaler``; ``poison_step`` makes one
    gradient infinite in that step. Returns the metrics, the weights and the expert biases after
    each step, and the optimizer."""
    cfg = make_config("mla", {"clip": clip})
    cfg.training.check_for_nan_in_loss_and_grad = check_nan
    cfg.training.lr_warmup_iters = 2  # a schedule that moves each step
    validate(cfg, 1)
    state = ParallelState.single()
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    opt.loss_scaler = loss_scaler
    data = MicroBatches(cfg, state, CPU)
    poisoned = {"on": False}
    victim = next(p for p in model.parameters() if p.ndim == 2)
    victim.register_hook(lambda g: g * math.inf if poisoned["on"] else g)
    metrics, weights, biases = [], [], []
    for step in range(1, steps + 1):
        poisoned["on"] = step == poison_step
        metrics.append(train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro)],
                                  step, cfg, state, None))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        biases.append([layer.gate.bias.clone() for layer in model.moe_layers() if layer.gate.bias is not None])
    return metrics, weights, biases, opt


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_a_power_of_two_loss_scale_changes_nothing(clip):
    want, want_weights, _, _ = _train(None, clip)
    got, got_weights, _, _ = _train(LossScaler(scale=2.0 ** 20, dynamic=False), clip)
    assert [m.lm_loss for m in got] == [m.lm_loss for m in want]
    assert [m.grad_norm for m in got] == [m.grad_norm for m in want]
    if clip:
        assert all(m.grad_norm > clip for m in want)  # the clip was due on every step
    for name, tensor in want_weights[-1].items():
        assert torch.equal(got_weights[-1][name], tensor), name


def _pipeline_run(scaled: bool):
    """Two steps of PP 2 with balancing and z losses on every stage (float64), with or without
    a loss scale of 2**20; this rank's metrics and weights."""
    cfg = make_config("gqa", {"pp": 2, "layers": 4})
    cfg.training.train_iters = 2
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    opt.loss_scaler = LossScaler(scale=2.0 ** 20, dynamic=False) if scaled else None
    data = MicroBatches(cfg, state, CPU)
    metrics = [train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro)], step, cfg, state, None)
               for step in (1, 2)]
    return [(m.lm_loss, m.grad_norm, m.aux_losses) for m in metrics], {n: p.detach() for n, p in model.named_parameters()}


def test_the_loss_scale_is_exact_across_pipeline_stages(workers):
    """Each stage scales its own losses (the balancing losses of the first stage too), so the
    gradient it receives from the next stage and its own agree."""
    pool = workers(2)
    want, got = pool.run(_pipeline_run, False), pool.run(_pipeline_run, True)
    for (want_metrics, want_weights), (got_metrics, got_weights) in zip(want, got):
        assert got_metrics == want_metrics
        aux_step1 = want_metrics[0][2]
        assert len(aux_step1) == 3 and all(a > 0 for a in aux_step1)  # both stages' MoE layers balance
        for name, tensor in want_weights.items():
            assert torch.equal(got_weights[name], tensor), name


def test_an_overflowed_step_is_skipped_and_the_scale_backs_off():
    scaler = LossScaler(scale=2.0 ** 10, min_scale=1.0, window=1000, hysteresis=1, hysteresis_tracker=1)
    metrics, weights, biases, opt = _train(scaler, poison_step=2)
    assert [m.skipped for m in metrics] == [False, True, False]
    assert [m.loss_scale for m in metrics] == [2.0 ** 10, 2.0 ** 10, 2.0 ** 9]
    assert not math.isfinite(metrics[1].grad_norm)
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor), name  # step 2 left every weight as it was
    assert biases[0]  # the model has expert biases (DeepSeek-V3's aux-free balancing)
    for layer_biases in zip(*biases[:2]):
        assert torch.equal(*layer_biases)  # and every expert bias
    assert opt.step_count() == 2 and scaler.skipped == 1
    assert metrics[2].lr == metrics[1].lr != metrics[0].lr  # the schedule waited one step
    assert math.isfinite(metrics[2].grad_norm)
    assert all(not torch.equal(weights[2][n], t) for n, t in weights[1].items() if t.ndim == 2)  # step 3 went through


def test_without_the_nan_check_a_non_finite_step_is_skipped():
    """No loss scale and --no-check-for-nan-in-loss-and-grad: the poisoned step changes no
    weight, expert bias or step count and is reported skipped; the next step trains."""
    metrics, weights, biases, opt = _train(None, poison_step=2, check_nan=False)
    assert [m.skipped for m in metrics] == [False, True, False]
    assert not math.isfinite(metrics[1].grad_norm)
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor), name
    for layer_biases in zip(*biases[:2]):
        assert torch.equal(*layer_biases)
    assert opt.step_count() == 2
    assert all(torch.isfinite(t).all() for t in weights[2].values())
    assert all(not torch.equal(weights[2][n], t) for n, t in weights[1].items() if t.ndim == 2)


def test_the_loss_scale_is_checkpointed(tmp_path):
    cfg = _config("--fp16", "--seq-length", "16")
    state = ParallelState.single()
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    opt.loss_scaler.scale, opt.loss_scaler.growth_tracker, opt.loss_scaler.skipped = 2.0 ** 17, 5, 3
    opt.loss_scaler.hysteresis_tracker = 1
    save_checkpoint(str(tmp_path), 4, model, opt, state, cfg, 32, None, CPU)
    target = build(cfg, state)
    fresh = build_optimizer(target, cfg, state)
    assert fresh.loss_scaler != opt.loss_scaler
    load_checkpoint(str(tmp_path), target, fresh, state, cfg, None, CPU)
    assert fresh.loss_scaler == opt.loss_scaler


def test_an_fp16_run_skips_its_first_steps_then_trains(tmp_path):
    """From 2**32 the fp16 gradients overflow; with --hysteresis 1 each overflow halves the
    scale until the steps go through."""
    proc = run_script(str(ROOT / "pretrain_moe.py"), "--config", str(ROOT / "examples/configs/demo.yaml"),
                      "--fp16", "--hysteresis", "1", "--seq-length", "16", "--train-iters", "20", "--log-interval", "20",
                      "--eval-iters", "0", "--metrics-file", str(tmp_path / "m.jsonl"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in records]
    assert skipped[0] and not skipped[-1] and sum(skipped) < len(skipped) - 4
    first_taken = skipped.index(False)
    assert all(skipped[:first_taken])
    assert records[first_taken]["loss_scale"] == 2.0 ** (32 - first_taken)
    assert records[-1]["lm_loss"] < records[first_taken]["lm_loss"]
    assert f"number of skipped iterations: {sum(skipped):3d}" in proc.stdout
