"""Checkpoints (megamoe/training/checkpoint.py).

- Exact resume: a 2-rank job (TP 2 + SP, dropout on) killed with SIGKILL during iteration 5
  (6 with --async-save), resumed from its checkpoint of iteration 3, gives iterations 4-6
  bitwise equal to an uninterrupted run (losses and grad norms), on mock data and on an
  indexed dataset.
- Resharding: saved in one layout after 2 steps, loaded in another for steps 3-4: losses, grad
  norms and the final weights match the uninterrupted single-process run (float64, 1e-9
  relative), across TP 2 + SP, PP 2 x VPP 2, uneven PP stages, a layout string, EP 4 x
  expert-TP 2, CP 2, DP with the distributed optimizer, all dimensions on 8 ranks, and one
  process; on a GPU with
  Transformer Engine, between the torch and te expert backends.
- A save killed before it completes leaves the previous checkpoint to --load; bad checkpoints
  and an unwritable --save are one-line errors.
- A failed async save is reported and never recorded; an async save writes the values of the
  moment it started (on a GPU, from a GPU clone or straight from a host copy).
- Stopping: SIGTERM with --exit-signal-handler saves a loadable checkpoint and exits 0, and
  every rank stops after the iteration in which any rank was signalled;
  --exit-interval and --exit-duration-in-mins save and stop; --ckpt-keep-latest prunes; a
  non-finite grad norm stops the run before the step, naming the iteration and the rank, and
  leaves the last checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megamoe.config import ConfigError
from megamoe.config_validation import validate
from megamoe.data.indexed_dataset import IndexedDatasetWriter
from megamoe.parallel.state import ParallelState
from megamoe.testing.parity import TOL, build, gather_all, make_config
from megamoe.testing.scripts import run_script
from megamoe.training import checkpoint
from megamoe.training.checkpoint import iteration_dir, latest_iteration, load_checkpoint, save_checkpoint
from megamoe.training.train import MicroBatches, build_optimizer, train_step

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------
# exact resume, through torchrun


def _launch(args: list[str], metrics: Path, kill_after: int | None = None) -> subprocess.CompletedProcess | int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "pretrain_moe.py"), "--config", str(ROOT / "examples/configs/demo.yaml"),
           "--seq-length", "32", "--tensor-model-parallel-size", "2", "--sequence-parallel",
           "--hidden-dropout", "0.1", "--attention-dropout", "0.1",  # resumed RNG streams matter
           "--eval-iters", "0", "--log-interval", "1", "--metrics-file", str(metrics), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_after is None:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    # SIGKILL the whole job as soon as iteration `kill_after` is logged, i.e. during the next one
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    for line in proc.stdout:
        if f"iteration {kill_after:8d}/" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return proc.returncode


def _records(metrics: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in rows}


def _indexed_dataset(directory: Path) -> list[str]:
    prefix = str(directory / "docs")
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix, np.int32)
    for _ in range(400):
        writer.add_document(rng.integers(0, 50, size=int(rng.integers(8, 60))))
    writer.finalize()
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--split", "100,0,0",
            "--data-cache-path", str(directory / "cache")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 6-iteration run each data source's resumed runs must reproduce, launched once."""
    runs = {}

    def run(data: str) -> tuple[list[str], dict]:
        if data not in runs:
            directory = tmp_path_factory.mktemp(f"whole_{data}")
            extra = ["--mock-data"] if data == "mock" else _indexed_dataset(directory)
            _launch([*extra, "--train-iters", "6"], directory / "whole.jsonl")
            runs[data] = extra, _records(directory / "whole.jsonl")
        return runs[data]

    return run


# each data source once, and each way of saving once (the indexed dataset's resume with the
# asynchronous save, the harder pair; three cases cost another 40 s of launches on two cores)
@pytest.mark.parametrize("data, async_save", [("mock", False), ("indexed", True)])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, uninterrupted, data, async_save):
    extra, want = uninterrupted(data)
    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3"] + (["--async-save"] if async_save else [])
    # an async save is recorded after a later iteration once every rank's write finished:
    # killed during iteration 6 it has been; a synchronous one, killed during iteration 5
    code = _launch([*extra, *save, "--train-iters", "9"], tmp_path / "killed.jsonl", kill_after=5 if async_save else 4)
    assert code != 0 and latest_iteration(str(ckpt)) == 3  # killed before the save at 6
    resumed = _launch([*extra, *save, "--train-iters", "6"], tmp_path / "resumed.jsonl")
    assert "loaded weights and optimizer of iteration 3" in resumed.stdout
    got = _records(tmp_path / "resumed.jsonl")
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it] == want[it], (it, got[it], want[it])  # bitwise: loss and grad norm


# ---------------------------------------------------------------------------------------------
# resharding, on the worker pools


def _steps(cfg, state, model, opt, tracker, first: int, last: int) -> list[tuple[float, float]]:
    data = MicroBatches(cfg, state, CPU)
    out = []
    for step in range(first, last + 1):
        m = train_step(model, opt, [data.get(step - 1, j) for j in range(data.num_micro)], step, cfg, state, tracker)
        out.append((m.lm_loss, m.grad_norm))
    return out


def _phase(layout: dict, directory: str, save: bool) -> tuple[list, dict]:
    """Train steps 1-2 and save (``save``), or load and train steps 3-4; returns the metrics and,
    after loading, the final weights as global tensors."""
    cfg = make_config("mtp_capacity", {**layout, "gbs": 8, "layers": 4})
    cfg.training.train_iters = 4
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    tracker = None  # as the parity tests: the model's dropout is off, so every layout draws nothing
    if save:
        metrics = _steps(cfg, state, model, opt, tracker, 1, 2)
        save_checkpoint(directory, 2, model, opt, state, cfg, 16, tracker, CPU)
        return metrics, {}
    loaded = load_checkpoint(directory, model, opt, state, cfg, tracker, CPU)
    assert loaded.iteration == 2 and loaded.consumed_samples == 16
    metrics = _steps(cfg, state, model, opt, tracker, 3, 4)
    opt.finish_param_sync()
    weights = gather_all({name: (p.detach(), p) for name, p in model.named_parameters()}, state)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return metrics, {**weights, **buffers}


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted single-process run: steps 1-4 and the weights after them."""
    cfg = make_config("mtp_capacity", {"gbs": 8, "layers": 4})
    cfg.training.train_iters = 4
    state = ParallelState.single()
    model = build(cfg, state)
    opt = build_optimizer(model, cfg, state)
    metrics = _steps(cfg, state, model, opt, None, 1, 4)
    weights = gather_all({name: (p.detach(), p) for name, p in model.named_parameters()}, state)
    return metrics, {**weights, **{name: b.clone() for name, b in model.named_buffers()}}


def _run(workers, world: int, layout: dict, directory: str, save: bool):
    if world == 1:
        return _phase(layout, directory, save)
    results = workers(world).run(_phase, layout, directory, save)
    return results[0]  # every rank returns the same metrics; rank 0 holds first-stage weights


ALL_DIMS = {"tp": 2, "sp": True, "cp": 2, "pp": 2, "ep": 2, "etp": 1, "dispatcher": "alltoall", "distopt": True}
RESHARD = [  # (world, layout) saved -> (world, layout) loaded
    ((4, {"tp": 2, "sp": True}), (4, {"pp": 2, "vpp": 2})),
    ((8, {"ep": 4, "etp": 2, "tp": 2}), (4, {"cp": 2, "distopt": True})),
    ((4, {"distopt": True}), (8, ALL_DIMS)),
    ((8, ALL_DIMS), (1, {})),
    ((1, {}), (4, {"ep": 4, "etp": 1, "dispatcher": "alltoall", "distopt": True})),
    ((4, {"pp": 2, "first": 1}), (4, {"tp": 2, "sp": True, "distopt": True})),  # uneven stages (1 + 3 layers)
    ((2, {"pp": 2, "schedule": "dualpipev"}), (4, {"pp": 2, "ep": 2, "dispatcher": "alltoall"})),  # the V placement
    ((2, {"pp": 2, "pp_layout": "Etttt|mL"}), (1, {})),  # a layout string: the last stage holds MTP and head only
]


@pytest.mark.parametrize("saved, loaded", RESHARD, ids=lambda x: f"{x[0]}:{','.join(map(str, x[1])) or 'single'}")
def test_a_checkpoint_loads_in_another_layout(workers, tmp_path, reference, saved, loaded):
    want_metrics, want_weights = reference
    first, _ = _run(workers, *saved, str(tmp_path), save=True)
    rest, weights = _run(workers, *loaded, str(tmp_path), save=False)
    for (loss, norm), (want_loss, want_norm) in zip(first + rest, want_metrics):
        assert abs(loss - want_loss) <= 1e-9 * abs(want_loss) and abs(norm - want_norm) <= 1e-9 * want_norm
    for name, tensor in weights.items():
        if name in want_weights:  # rank 0's stage
            torch.testing.assert_close(tensor, want_weights[name], **TOL, msg=name)


def test_adam_moments_load_into_either_dtype(tmp_path):
    """A checkpoint of bf16 moments loads into a run that keeps them in bf16 or in the masters'
    dtype (float64 here), each holding the saved values exactly; one of float64 moments loads
    into bf16 ones rounded to nearest."""
    single = ParallelState.single()

    def trained(moments: str, steps: int):
        cfg = make_config("mla", {"gbs": 4, "moments": moments})
        model = build(cfg, single)
        opt = build_optimizer(model, cfg, single)
        _steps(cfg, single, model, opt, None, 1, steps)
        return cfg, model, opt

    def moments_of(opt) -> list[torch.Tensor]:
        return [s[k] for s in opt.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]

    for saved_dtype, loaded_dtype in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "bf16")):
        directory = str(tmp_path / f"{saved_dtype}_{loaded_dtype}")
        cfg, model, opt = trained(saved_dtype, 2)
        save_checkpoint(directory, 2, model, opt, single, cfg, 8, None, CPU)
        cfg, model, loaded = trained(loaded_dtype, 0)
        load_checkpoint(directory, model, loaded, single, cfg, None, CPU)
        want_dtype = torch.bfloat16 if loaded_dtype == "bf16" else torch.float64
        for got, want in zip(moments_of(loaded), moments_of(opt)):
            assert got.dtype == want_dtype
            assert torch.equal(got, want.to(want_dtype))


# ---------------------------------------------------------------------------------------------
# kills and bad input, in one process


def _demo_config(train_iters: int, **ckpt):
    """The demo model at sequence 16 with the given checkpoint flags, validated."""
    from megamoe.testing.presets import preset

    cfg = preset("demo")
    cfg.model.seq_length, cfg.training.train_iters, cfg.training.eval_iters = 16, train_iters, 0
    for k, v in ckpt.items():
        setattr(cfg.checkpoint, k, v)
    validate(cfg, 1)
    return cfg


def _single(**ckpt):
    cfg = _demo_config(2, **ckpt)
    state = ParallelState.single()
    model = build(cfg, state)
    return cfg, state, model, build_optimizer(model, cfg, state)


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg, state, model, opt = _single()
    save_checkpoint(str(tmp_path), 1, model, opt, state, cfg, 8, None, CPU)

    def dies_mid_write(state_dict, storage_writer, **kw):  # the process dies inside DCP's write
        (Path(storage_writer.fs.concat_path(storage_writer.path, "__0_0.distcp"))).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.dcp, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, model, opt, state, cfg, 16, None, CPU)
    assert latest_iteration(str(tmp_path)) == 1 and not (tmp_path / "iter_0000002").exists()
    monkeypatch.undo()
    loaded = load_checkpoint(str(tmp_path), model, opt, state, cfg, None, CPU)
    assert loaded.iteration == 1
    save_checkpoint(str(tmp_path), 2, model, opt, state, cfg, 16, None, CPU)  # the stale .tmp is replaced
    assert latest_iteration(str(tmp_path)) == 2 and not (tmp_path / "iter_0000002.tmp").exists()


def test_a_writer_thread_that_fails_fails_the_save(tmp_path, monkeypatch):
    """DCP's extra writer threads drop their exceptions; the save must fail all the same."""
    import threading

    cfg, state, model, opt = _single()
    save_checkpoint(str(tmp_path), 1, model, opt, state, cfg, 8, None, CPU)
    real = checkpoint._PieceSavePlanner.resolve_data
    failed = []

    def fails_off_the_main_thread(self, item):
        if threading.current_thread() is not threading.main_thread() and not failed:
            failed.append(item.index.fqn)
            raise OSError("No space left on device")
        return real(self, item)

    monkeypatch.setattr(checkpoint._PieceSavePlanner, "resolve_data", fails_off_the_main_thread)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's own report
    with pytest.raises(RuntimeError, match="pieces were not written"):
        save_checkpoint(str(tmp_path), 2, model, opt, state, cfg, 16, None, CPU)
    assert failed and latest_iteration(str(tmp_path)) == 1 and not (tmp_path / "iter_0000002").exists()


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    cfg, state, model, opt = _single()
    save_checkpoint(str(tmp_path / "ok"), 1, model, opt, state, cfg, 8, None, CPU)
    # another model: a wider FFN
    other, *_ = _single()
    other.moe.moe_ffn_hidden_size *= 2
    wide = build(other, state)
    with pytest.raises(ConfigError, match=r"holds a different model: model/\S+ is \[.*\] there, \[.*\] here") as err:
        load_checkpoint(str(tmp_path / "ok"), wide, build_optimizer(wide, other, state), state, other, None, CPU)
    assert "\n" not in str(err.value)
    # a truncated shard file
    shard = next((tmp_path / "ok" / "iter_0000001").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConfigError, match="corrupt or incomplete"):
        load_checkpoint(str(tmp_path / "ok"), model, opt, state, cfg, None, CPU)
    # a directory without a checkpoint: a fresh start (None), one with a broken tracker: an error
    assert load_checkpoint(str(tmp_path / "empty"), model, opt, state, cfg, None, CPU) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / checkpoint.TRACKER).write_text("latest")
    with pytest.raises(ConfigError, match="not an iteration number"):
        load_checkpoint(str(tmp_path / "broken"), model, opt, state, cfg, None, CPU)


def test_no_save_optim_writes_the_weights_only(tmp_path):
    cfg, state, model, opt = _single(no_save_optim=True)
    save_checkpoint(str(tmp_path), 1, model, opt, state, cfg, 8, None, CPU)
    saved = checkpoint.dcp.FileSystemReader(str(tmp_path / "iter_0000001")).read_metadata().state_dict_metadata
    assert saved and all(k.startswith("model/") for k in saved)
    names = {"model/" + n for n, _ in model.named_parameters()}
    assert names <= set(saved)
    # resuming it with the optimizer is refused, naming the flags that load it
    other_cfg, _, other, other_opt = _single()
    with pytest.raises(ConfigError, match="saved with --no-save-optim .* give --no-load-optim"):
        load_checkpoint(str(tmp_path), other, other_opt, state, other_cfg, None, CPU)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_checkpoint(str(tmp_path), other, other_opt, state, other_cfg, None, CPU, load_optim=False)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name


def _with_a_stray_tensor(tmp_path, strictness: str):
    """A checkpoint of the demo model plus one tensor the model does not have, loaded under
    ``--dist-ckpt-strictness strictness``."""
    cfg, state, model, opt = _single()
    model.register_buffer("stray", torch.ones(3))
    save_checkpoint(str(tmp_path), 1, model, opt, state, cfg, 8, None, CPU)
    cfg2, _, model2, opt2 = _single(dist_ckpt_strictness=strictness)
    return load_checkpoint(str(tmp_path), model2, opt2, state, cfg2, None, CPU)


@pytest.mark.parametrize("strictness", ["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
                                        "raise_all", "ignore_all"])
def test_dist_ckpt_strictness_on_a_tensor_the_model_lacks(tmp_path, strictness, caplog):
    if strictness.startswith("raise"):
        with pytest.raises(ConfigError, match=r"holds 1 tensors this model does not have .*: model/stray"):
            _with_a_stray_tensor(tmp_path, strictness)
        return
    with caplog.at_level("WARNING", logger="megamoe.training.checkpoint"):
        assert _with_a_stray_tensor(tmp_path, strictness).iteration == 1
    logged = "model/stray" in caplog.text
    assert logged == strictness.startswith("log"), caplog.text


def test_an_unwritable_save_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made under a file (even by root)
    with pytest.raises(ConfigError, match=r"--save \S+/a_file/ckpt: not writable") as err:
        _single(save=str(blocker / "ckpt"))
    assert "\n" not in str(err.value)


def test_pretrain_reports_a_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / checkpoint.TRACKER).write_text("7")
    proc = run_script("pretrain_moe.py", "--config", "examples/configs/demo.yaml", "--mock-data",
                      "--seq-length", "16", "--train-iters", "1", "--load", str(tmp_path), cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "is not a complete megamoe checkpoint" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# stopping


def test_exit_interval_saves_and_stops_and_old_checkpoints_are_pruned(tmp_path):
    from megamoe.training.train import train

    cfg = _demo_config(10, save=str(tmp_path), save_interval=1, exit_interval=4, ckpt_keep_latest=2)
    history = train(cfg, ParallelState.single(), CPU)
    assert [m.iteration for m in history] == [1, 2, 3, 4] and latest_iteration(str(tmp_path)) == 4
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]


def test_an_fp8_run_resumes_exactly(tmp_path):
    """The native FP8 recipes keep no scaling state: a run stopped and resumed from its
    checkpoint gives the uninterrupted run's losses and grad norms, bit for bit. The run keeps
    Adam's moments in bf16, which the checkpoint stores as they are."""
    from megamoe.training.train import train

    def fp8_config(**ckpt):
        cfg = _demo_config(4, **ckpt)
        cfg.training.bf16, cfg.model.fp8_format, cfg.model.fp8_recipe = True, "hybrid", "rowwise"
        t = cfg.training
        t.use_precision_aware_optimizer, t.exp_avg_dtype, t.exp_avg_sq_dtype = True, "bf16", "bf16"
        validate(cfg, 1)
        return cfg

    whole = train(fp8_config(), ParallelState.single(), CPU)
    train(fp8_config(save=str(tmp_path), save_interval=2, exit_interval=2), ParallelState.single(), CPU)
    saved = dcp.FileSystemReader(iteration_dir(str(tmp_path), 2)).read_metadata().state_dict_metadata
    moments = {saved[k].properties.dtype for k in saved if k.startswith("optim/exp_avg")}
    assert moments == {torch.bfloat16}
    resumed = train(fp8_config(load=str(tmp_path)), ParallelState.single(), CPU)
    assert [m.iteration for m in resumed] == [3, 4]
    assert [(m.lm_loss, m.grad_norm) for m in resumed] == [(m.lm_loss, m.grad_norm) for m in whole[2:]]


def test_exit_duration_saves_and_stops(tmp_path):
    from megamoe.training.train import train

    cfg = _demo_config(10, save=str(tmp_path), exit_duration_in_mins=1e-6)
    history = train(cfg, ParallelState.single(), CPU)
    assert [m.iteration for m in history] == [1] and latest_iteration(str(tmp_path)) == 1


def test_a_non_finite_grad_norm_stops_before_the_step_and_saves_nothing(tmp_path, monkeypatch):
    from megamoe.training import train as train_module
    from megamoe.training.stopping import NonFiniteError

    real_step = train_module.train_step

    def poisoned(model, optimizer, batches, step, *args, **kwargs):
        if step == 3:  # a weight goes NaN before iteration 3
            with torch.no_grad():
                model.norm.weight[0] = float("nan")  # the final norm: every token reads it
        return real_step(model, optimizer, batches, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", poisoned)
    cfg = _demo_config(10, save=str(tmp_path), save_interval=1)
    with pytest.raises(NonFiniteError, match=r"^iteration 3: the grad norm is nan \(first non-finite on rank 0\)"):
        train_module.train(cfg, ParallelState.single(), CPU)
    assert latest_iteration(str(tmp_path)) == 2 and not (tmp_path / "iter_0000003").exists()


def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(tmp_path):
    args = [sys.executable, "pretrain_moe.py", "--config", "examples/configs/demo.yaml", "--mock-data",
            "--seq-length", "16", "--eval-iters", "0", "--log-interval", "1", "--save", str(tmp_path),
            "--load", str(tmp_path)]
    proc = subprocess.Popen([*args, "--train-iters", "100000", "--exit-signal-handler"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iteration        2/" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(lines[-20:])
    stopped = latest_iteration(str(tmp_path))
    assert stopped >= 2 and any(f"exiting after iteration {stopped}: SIGTERM" in x for x in lines)
    resumed = subprocess.run([*args, "--train-iters", str(stopped + 1)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0 and f"loaded weights and optimizer of iteration {stopped}" in resumed.stdout


def test_the_checkpoint_benchmark_runs(tmp_path):
    proc = run_script("tools/bench_checkpoint.py", "--dir", str(tmp_path / "c"), "--",
                      "--config", "examples/configs/demo.yaml", "--seq-length", "16", cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "async save first: blocked" in proc.stdout and not (tmp_path / "c").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("saved, loaded", [("torch", "te"), ("te", "torch")])
def test_a_checkpoint_crosses_expert_backends_on_gpu(tmp_path, saved, loaded):
    """TE keeps one weight per expert; its specs place them in the same global w13 / w2."""
    pytest.importorskip("transformer_engine.pytorch")
    from megamoe.testing.presets import preset
    from megamoe.training.train import build_model

    device, state = torch.device("cuda"), ParallelState.single()

    def model(backend: str, seed: int):
        cfg = preset("demo")
        cfg.moe.moe_grouped_gemm_impl, cfg.training.seed, cfg.training.bf16 = backend, seed, True
        m = build_model(cfg, state, device)
        return cfg, m, build_optimizer(m, cfg, state)

    cfg, source, source_opt = model(saved, 1)
    save_checkpoint(str(tmp_path), 1, source, source_opt, state, cfg, 0, None, device)
    cfg, target, target_opt = model(loaded, 2)  # other initial weights
    load_checkpoint(str(tmp_path), target, target_opt, state, cfg, None, device)
    for a, b in zip(source.moe_layers(), target.moe_layers()):
        want, got = a.experts.stacked(), b.experts.stacked()
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_a_failed_async_save_is_reported_and_never_recorded(tmp_path, monkeypatch):
    cfg, state, model, opt = _single()
    save_checkpoint(str(tmp_path), 1, model, opt, state, cfg, 8, None, CPU)

    def disk_full(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.dcp.FileSystemWriter, "write_data", disk_full)
    saver = checkpoint.AsyncSaver(state, CPU)
    saver.start(str(tmp_path), 2, model, opt, cfg, 16, None)
    with pytest.raises(RuntimeError, match="saving iteration 2 .* failed on rank 0: .*No space left.*previous checkpoint"):
        saver.wait()
    assert latest_iteration(str(tmp_path)) == 1 and not (tmp_path / "iter_0000002").exists()


def test_an_async_save_writes_the_values_of_the_moment_it_started(tmp_path):
    cfg, state, model, opt = _single()
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    saver = checkpoint.AsyncSaver(state, CPU)
    saver.start(str(tmp_path), 1, model, opt, cfg, 8, None)
    with torch.no_grad():  # training changes every tensor while the save is in flight
        for p in model.parameters():
            p.add_(1.0)
    saver.wait()
    saver.close()
    _, _, target, target_opt = _single()
    load_checkpoint(str(tmp_path), target, target_opt, state, cfg, None, CPU)
    for n, p in target.named_parameters():
        assert torch.equal(p, want[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("room", ["gpu", "none"])
def test_the_async_snapshot_holds_the_values_it_was_taken_with_on_gpu(room, monkeypatch):
    """Cloned on the GPU when there is room (then copied to the host on a side stream while the
    tensors change), copied straight to the host when there is none."""
    from megamoe.training import snapshot

    if room == "none":
        monkeypatch.setattr(snapshot, "gpu_room", lambda device: 0)
    device = torch.device("cuda")
    tensors = {f"t{i}": torch.randn(1 << 20, device=device) for i in range(4)}
    want = {k: t.cpu() for k, t in tensors.items()}
    shot = snapshot.Snapshot(device)
    staged = shot.take(tensors)
    assert shot.where.startswith("the GPU" if room == "gpu" else "pinned")
    for t in tensors.values():  # queued on the compute stream before the host copy starts
        t.mul_(0.0)
    host = staged()
    for k in tensors:
        assert host[k].is_pinned() and torch.equal(host[k], want[k]), k


def _exit_agreement():
    from megamoe.config import CheckpointConfig
    from megamoe.training.stopping import ExitConditions

    state = ParallelState.build()
    exits = ExitConditions(CheckpointConfig(exit_signal_handler=True), state, CPU)
    first = exits.reason(1)
    exits.signalled = state.rank == 1  # only rank 1 got the signal
    return first, exits.reason(2)


def test_every_rank_stops_after_the_iteration_one_rank_was_signalled(workers):
    assert workers(2).run(_exit_agreement) == [(None, "SIGTERM (--exit-signal-handler)")] * 2
