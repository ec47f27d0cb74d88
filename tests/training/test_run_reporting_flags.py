"""Megatron-LM's reporting and housekeeping flags in a real (one-process) run: tensorboard's
extra scalars (--log-validation-ppl-to-tensorboard, --log-timers-to-tensorboard), Weights &
Biases (--wandb-*, through a stand-in for the wandb package that records its calls),
--log-params-norm against the norm of the trained weights, and --manual-gc's collections."""

from __future__ import annotations

import gc
import importlib.util
import math
import sys

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.parallel.state import ParallelState
from megamoe.testing.fake_wandb import FakeWandb
from megamoe.testing.presets import preset
from megamoe.training import train as train_module
from megamoe.training.train import train


def _recording(build_model, built: list):
    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.append(model)
        return model
    return build


def _scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_wandb_and_manual_gc_flags(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(gc.isenabled()) or real_collect(*a))

    cfg = preset("demo")
    cfg.model.seq_length, cfg.training.train_iters = 16, 6
    cfg.training.eval_iters, cfg.training.eval_interval = 1, 3
    cfg.training.manual_gc, cfg.training.manual_gc_interval = True, 2
    cfg.checkpoint.save, cfg.checkpoint.save_interval = str(tmp_path / "ckpt"), 3
    log = cfg.logging
    log.tensorboard_dir, log.log_interval = str(tmp_path / "tb"), 1
    log.log_validation_ppl_to_tensorboard = log.log_timers_to_tensorboard = log.log_params_norm = True
    log.wandb_project, log.wandb_exp_name = "proj", "run-1"
    validate(cfg, 1)
    final_weights = []
    monkeypatch.setattr(train_module, "build_model", _recording(train_module.build_model, final_weights))
    history = train(cfg, ParallelState.single(), torch.device("cpu"))

    # --manual-gc: the collector is off during the run and back on after it; collections at the
    # start, after iterations 2, 4, 6, and before and after the evaluations at 3 and 6
    assert gc.isenabled()
    assert len(collections) == 1 + 3 + 4 and not any(collections)

    tb = _scalars(tmp_path / "tb")
    # --log-params-norm: the norm of the parameters as they are after the last step (float32 run)
    (model,) = final_weights
    by_hand = torch.cat([p.detach().double().flatten() for p in model.parameters()]).norm().item()
    assert math.isclose(history[-1].params_norm, by_hand, rel_tol=1e-6)  # per-tensor norms in float32
    assert math.isclose(tb["params-norm"][6], by_hand, rel_tol=1e-6)  # tensorboard stores float32
    assert set(tb["timers/iteration-time"]) == set(range(1, 7))
    assert all(t > 0 for t in tb["timers/iteration-time"].values())
    assert set(tb["timers/evaluate"]) == set(tb["timers/save-checkpoint"]) == {3, 6}
    for step in (3, 6):
        assert math.isclose(tb["validation/lm-loss-ppl"][step], math.exp(tb["validation/lm-loss"][step]),
                            rel_tol=1e-5)

    # W&B: one run, named, under --save/wandb, with the config; the same scalars at the same steps
    assert len(fake.inits) == 1 and fake.finished == 1
    init = fake.inits[0]
    assert (init["project"], init["name"], init["dir"]) == ("proj", "run-1", str(tmp_path / "ckpt" / "wandb"))
    assert init["config"]["training"]["train_iters"] == 6
    losses = {step: value for tag, value, step in fake.logged if tag == "lm-loss"}
    assert losses == {m.iteration: m.lm_loss for m in history}
    assert {step for tag, _, step in fake.logged if tag == "validation/lm-loss-ppl"} == {3, 6}
    assert any(tag.startswith("moe/tokens-per-expert/") and value[0] == "histogram" for tag, value, _ in fake.logged)


@pytest.mark.parametrize("flags, message", [
    (dict(wandb_exp_name="x"), "--wandb-exp-name has no effect without --wandb-project"),
    (dict(wandb_project="p"), "the wandb package is not installed"),
])
def test_wandb_flags_refused(flags, message, monkeypatch):
    real_find = importlib.util.find_spec  # wandb as if not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find(name, *a))
    cfg = preset("demo")
    for name, value in flags.items():
        setattr(cfg.logging, name, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)


def test_manual_gc_interval_needs_manual_gc():
    cfg = preset("demo")
    cfg.training.manual_gc_interval = 5
    with pytest.raises(ConfigError, match="--manual-gc-interval 5 has no effect without --manual-gc"):
        validate(cfg, 1)


def test_num_zeros_in_grad_counts_the_zero_gradient_elements():
    """--log-num-zeros-in-grad against a count by hand of the main gradients the step left (the
    padded vocabulary rows and the experts no token reached are zero)."""
    from megamoe.testing.parity import build, make_config
    from megamoe.training.optimizer import MixedPrecisionAdamW
    from megamoe.training.train import MicroBatches, train_step

    cfg = make_config("mla", {"gbs": 2})
    state = ParallelState.single()
    model = build(cfg, state)
    opt = MixedPrecisionAdamW(model, cfg.training, state)
    data = MicroBatches(cfg, state, torch.device("cpu"))
    got = train_step(model, opt, [data.get(0, j) for j in range(data.num_micro)], 1, cfg, state, None)
    by_hand = sum(int((p.main_grad == 0).sum()) for p in model.parameters())
    assert got.num_zeros == by_hand > 0
