"""Training pieces: LR schedule, FLOPs formula, mock data, presets, the end-to-end run, the
reports, and the parity tool's verdicts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megamoe.cli import config_from_values, load_yaml_values, parse_config
from megamoe.config import Config, ConfigError
from megamoe.config_validation import validate
from megamoe.data.mock import MarkovMockData
from megamoe.model.args import gpt_args
from megamoe.model.gpt import GPTModel
from megamoe.parallel.state import ParallelState
from megamoe.testing.scripts import run_script
from megamoe.training.flops import flops_per_token
from megamoe.training.heatmap import expert_load_figure, figure_to_rgb
from megamoe.training.schedule import learning_rate
from megamoe.training.train import train

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "examples" / "configs"


def test_schedule_by_hand():
    # Megatron-LM's scheduler: step k runs at the value after k - 1 steps (it advances after the
    # optimizer step), so with warmup the first step runs at the warmup's start.
    t = Config().training
    t.lr, t.min_lr, t.lr_warmup_iters, t.train_iters = 1.0, 0.1, 10, 110
    t.lr_decay_style = "cosine"
    assert learning_rate(1, t) == 0.0
    assert learning_rate(6, t) == 0.5
    assert learning_rate(11, t) == 1.0
    assert math.isclose(learning_rate(61, t), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(learning_rate(111, t), 0.1) and learning_rate(112, t) == 0.1
    t.lr_decay_style = "linear"
    assert math.isclose(learning_rate(36, t), 0.1 + 0.9 * 0.75)
    t.lr_decay_style = "inverse-square-root"
    assert math.isclose(learning_rate(41, t), 0.5)  # sqrt(10 / 40)
    t.lr_decay_style = "constant"
    assert learning_rate(91, t) == 1.0
    t.lr_decay_style, t.lr_wsd_decay_iters, t.lr_wsd_decay_style = "WSD", 20, "linear"
    assert learning_rate(91, t) == 1.0  # stable until the last 20 iterations
    assert math.isclose(learning_rate(101, t), 0.1 + 0.9 * 0.5)
    t.lr_wsd_decay_style = "exponential"  # Megatron's: 2 x 0.5^r - 1 of the span, 0 at r = 1
    assert math.isclose(learning_rate(101, t), 0.1 + 0.9 * (2 * 0.5 ** 0.5 - 1))
    assert math.isclose(learning_rate(111, t), 0.1)
    t.lr_wsd_decay_style = "minus_sqrt"
    assert math.isclose(learning_rate(101, t), 0.1 + 0.9 * (1 - 0.5 ** 0.5))
    t.lr_decay_style, t.lr_warmup_init = "linear", 0.2
    assert math.isclose(learning_rate(6, t), 0.2 + 0.8 * 0.5)


def test_sample_based_schedule_by_hand():
    # --train-samples: the lengths are samples; step k runs after (k - 1) x 8 samples
    cfg = config_from_values({"train_samples": 880, "lr_warmup_samples": 20, "lr": 1.0, "min_lr": 0.0,
                              "global_batch_size": 8, "micro_batch_size": 4})
    validate(cfg, 1)
    t = cfg.training
    assert t.train_iters == 110
    assert math.isclose(learning_rate(2, t), 8 / 20) and math.isclose(learning_rate(3, t), 16 / 20)
    assert math.isclose(learning_rate(4, t), 1 - (24 - 20) / (880 - 20))  # linear decay to 880 samples
    t.lr_decay_samples, t.lr_warmup_samples, t.lr_warmup_fraction = 440, 0, 0.25  # warmup: 110 samples
    assert math.isclose(learning_rate(12, t), 88 / 110) and learning_rate(57, t) == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "10", "--train-samples", "80"], "give one"),
    (["--train-samples", "80", "--lr-decay-iters", "5"], "--lr-decay-iters: this run is sample-based"),
    (["--lr-warmup-samples", "16"], "--lr-warmup-samples: this run is iteration-based"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "give one"),
    (["--train-samples", "4", "--global-batch-size", "8"], "less than one step"),
])
def test_schedule_flags_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(flags), 1)


def test_a_command_line_train_samples_replaces_a_files_train_iters(tmp_path):
    preset = tmp_path / "run.yaml"
    preset.write_text("training:\n  train_iters: 100\n  global_batch_size: 16\n")
    cfg = parse_config(["--config", str(preset), "--train-samples", "64"])
    validate(cfg, 1)
    assert cfg.training.train_iters == 4


def test_flops_match_the_megatron_figure_for_the_v2_lite_proxy():
    # shared/gpu/README.md: 4 layers of DeepSeek-V2-Lite, seq 4096 -> 3.49e9 FLOPs per token,
    # LM head 36%, routed experts 27%. Recomputed here by hand from the shapes:
    D, V, s, H = 2048, 102400, 4096, 16
    head = D * V
    attn = D * H * 192 + D * 576 + 512 * H * 256 + H * 128 * D + (s / 2) * H * (192 + 128)
    dense = 3 * D * 10944
    moe = D * 64 + 6 * 3 * D * 1408 + 3 * D * 2816
    by_hand = 6 * (head + 4 * attn + dense + 3 * moe)
    cfg = config_from_values(load_yaml_values(str(PRESETS / "deepseek_v2_lite.yaml")))
    cfg.model.num_layers, cfg.moe.moe_layer_freq = 4, "[0]*1+[1]*3"
    got = flops_per_token(gpt_args(cfg), s, V)
    assert math.isclose(got, by_hand, rel_tol=1e-12)
    assert round(got / 1e9, 2) == 3.49
    assert round(6 * head / got, 2) == 0.36 and round(6 * 3 * 6 * 3 * D * 1408 / got, 2) == 0.27


def test_mock_data_is_a_function_of_the_sample_index():
    data = MarkovMockData(vocab_size=64, seq_length=16, seed=3)
    a = data.sequences([5, 9, 2])
    b = data.sequences([2, 5])
    assert (a[0] == b[1]).all() and (a[2] == b[0]).all()
    assert not (a[0] == a[1]).all()
    other_seed = MarkovMockData(vocab_size=64, seq_length=16, seed=4).sequences([5])
    assert not (other_seed[0] == a[0]).all()
    # each token is followed by one of its 4 successors only: far below ln(vocab)
    for seq in data.sequences(list(range(20))):
        for cur, nxt in zip(seq[:-1], seq[1:]):
            assert nxt in data.successors[cur]
    assert data.entropy_rate < math.log(4) < math.log(64)


# Published totals (weights in the released checkpoints). DeepSeek-V3 and Kimi K2 count the
# router bias; megamoe keeps it as a buffer, so it is added here.
PUBLISHED = {
    "mixtral_8x7b": 46_702_792_704,
    "qwen3_30b_a3b": 30_532_122_624,
    "deepseek_v2_lite": 15_706_484_224,
    "deepseek_v3": 671_026_419_200,
    "kimi_k2": 1_026_408_232_448,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(name):
    cfg = config_from_values(load_yaml_values(str(PRESETS / f"{name}.yaml")))
    cfg.data.make_vocab_size_divisible_by = 1  # count the released (unpadded) vocabulary
    validate(cfg, world_size=1)
    with torch.device("meta"):
        model = GPTModel(gpt_args(cfg), ParallelState.single())
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("gate.bias") and not n.startswith("mtp."))
    assert params + bias == PUBLISHED[name]


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("tiny_*.yaml")))
def test_tiny_presets_train(preset):
    cfg = config_from_values(load_yaml_values(str(PRESETS / preset)))
    cfg.training.eval_iters = 0
    validate(cfg, 1)
    history = train(cfg, ParallelState.single(), torch.device("cpu"))
    losses = [m.lm_loss for m in history]
    assert len(losses) == cfg.training.train_iters and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_bare_run_is_a_small_dense_gpt_that_learns():
    """`python pretrain_moe.py` with no flags: Megatron's default structure at a small size, the
    two notices for Megatron defaults megamoe does not build, one log line (interval 100, and
    always the last iteration) and the validation at the end."""
    proc = run_script("pretrain_moe.py", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("> notice:") == 2 and "learned absolute embeddings" in out and "--disable-bias-linear" in out
    lines = [line for line in out.splitlines() if "lm loss:" in line]
    assert len(lines) == 1 and "iteration       40/      40" in lines[0] and "load balancing" not in lines[0]
    assert float(lines[0].split("lm loss: ")[1].split()[0]) < 4.0 < math.log(512)
    assert "validation loss at iteration 40" in out


def test_demo_run_learns_and_reports(tmp_path):
    """The quick start's model on mock data (plus a report directory): the loss falls well
    below ln(vocab) and tensorboard and the metrics file are written."""
    tb, metrics = tmp_path / "tb", tmp_path / "metrics.jsonl"
    proc = run_script("pretrain_moe.py", "--config", "examples/configs/demo.yaml", "--log-interval", "5",
                      "--tensorboard-dir", str(tb), "--metrics-file", str(metrics),
                      "--moe-expert-load-image-interval", "10", "--log-max-attention-logit", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "iteration" in line and "lm loss:" in line]
    assert len(lines) == 8 and "iteration       40/      40" in lines[-1]
    for key in ("learning rate:", "grad norm:", "tokens/s:", "TFLOP/s/device:", "load balancing loss:",
                "max attention logit:"):
        assert key in lines[-1]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 40
    logits = rows[-1]["max_attention_logits"]  # one per layer, every layer ran
    assert len(logits) == 4 and all(math.isfinite(x) for x in logits), logits
    assert rows[0]["lm_loss"] > 6.0 and rows[-1]["lm_loss"] < 2.5 < math.log(512)
    assert any(tb.iterdir()) and f"> tensorboard: {tb}" in proc.stdout


@pytest.mark.parametrize("layers, experts, ep", [(4, 8, 2), (60, 256, 8)])
def test_expert_load_heatmap_is_labelled_and_marks_the_straggler(layers, experts, ep):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    load = rng.uniform(50, 150, size=(layers, experts))
    load[:, experts // ep: 2 * experts // ep] *= 3  # EP rank 1's experts get the most tokens
    load[0, 0] = 0.0
    names = [str(i + 1) for i in range(layers)]
    fig = expert_load_figure(load, ep, names, iteration=7)
    ax, ax_ep, bar = fig.axes
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer" and ax_ep.get_xlabel() == "EP rank"
    assert "straggler: rank 1" in ax_ep.get_title() and "iteration 7" in fig._suptitle.get_text()
    assert "1 = balanced" in bar.get_ylabel()
    xticks = [t.get_text() for t in ax.get_xticklabels()]
    yticks = [t.get_text() for t in ax.get_yticklabels()]
    assert xticks[0] == "0" and 2 <= len(xticks) <= 16 and yticks[0] == "1" and len(yticks) <= 16
    assert (len(ax.texts) == layers * experts) == (layers * experts <= 256)  # small grids carry values
    img = figure_to_rgb(fig)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[1] >= 600
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    assert red.any() and blue.any()  # over- and under-loaded cells are coloured apart


def test_check_parity_verdicts(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import check_parity

    def fake_run(layout, model_args, extra, iters, workdir, resume_at=1):
        drift = 1e-3 if layout == "tp=2" else 0.0
        return [{"iteration": i, "lm_loss": 5.0 + drift, "grad_norm": 1.0} for i in range(1, iters + 1)]

    monkeypatch.setattr(check_parity, "run_layout", fake_run)
    assert check_parity.main(["--models", "mla", "--layouts", "tp=1", "tp=2,sp"]) == 0
    assert check_parity.main(["--models", "mla", "--layouts", "tp=1", "tp=2"]) == 1
    assert "DRIFT" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check_parity.layout_args("tp=2,bogus=3")


def test_check_parity_runs_torchrun():
    # the second layout saves after iteration 1 at TP 2 + SP and resumes at TP 1
    proc = run_script("tools/check_parity.py", "--models", "gqa", "--layouts", "tp=1", "tp=2,sp>tp=1", "--iters", "2",
                      cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and proc.stdout.count("tp=2,sp>tp=1") == 2  # both iterations compared


def test_the_profile_counts_kernels_tied_to_no_cpu_event():
    """A kernel the profiler ties to no CPU event (one launched straight through the driver)
    still counts, as ``unattributed`` under its name; one tied to an op counts under the op's
    stage only. Events as torch's profiler lists them: CPU ops with their kernels, and every
    kernel again as a device event."""
    from types import SimpleNamespace as Event

    from megamoe.training.profiling import stage_times

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    stage = Event(name="stage:optimizer", sequence_nr=-1, cpu_parent=None, kernels=[], device_type=cpu)
    op = Event(name="aten::_foreach_add_", sequence_nr=-1, cpu_parent=stage, device_type=cpu,
               kernels=[Event(name="multi_tensor_apply_kernel", duration=5.0)])
    tied = Event(name="multi_tensor_apply_kernel", sequence_nr=-1, cpu_parent=None, device_type=cuda,
                 time_range=Event(start=0.0, end=5.0))
    loose = Event(name="_adamw_chunks", sequence_nr=-1, cpu_parent=None, device_type=cuda,
                  time_range=Event(start=10.0, end=30.0))
    # the stage's span as the GPU saw it: no kernel, not counted
    span = Event(name="stage:optimizer", sequence_nr=-1, cpu_parent=None, device_type=cuda, is_user_annotation=True,
                 time_range=Event(start=0.0, end=30.0))
    stages, kernels = stage_times([stage, op, tied, loose, span], use_device=True)
    assert stages == {"optimizer": 5.0, "unattributed": 20.0}
    assert kernels == {("optimizer", "multi_tensor_apply_kernel"): 5.0, ("unattributed", "_adamw_chunks"): 20.0}


def test_trace_gaps_finds_the_idle_time_and_the_host_call_behind_it(tmp_path):
    """tools/trace_gaps.py on a hand-made trace: two kernels on two streams overlap (busy once),
    then the GPU idles 470 us while the host waits in a stream synchronise, and the next kernel
    was launched from ``aten::add`` inside the stage ``stage:optimizer``."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_gaps", Path(__file__).parents[2] / "tools/trace_gaps.py")
    trace_gaps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_gaps)

    def x(cat, name, ts, dur, tid=1, **args):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid, **({"args": args} if args else {}))

    events = [x("cpu_op", "aten::mm", 10, 20), x("cuda_runtime", "cudaLaunchKernel", 12, 5, correlation=1),
              x("kernel", "gemm", 20, 100, tid=7, correlation=1), x("kernel", "copy", 60, 90, tid=8),
              x("cuda_runtime", "cudaStreamSynchronize", 40, 200),
              x("user_annotation", "stage:optimizer", 590, 100), x("cpu_op", "aten::add", 600, 30),
              x("cuda_runtime", "cudaLaunchKernel", 610, 5, correlation=2),
              x("kernel", "add_kernel", 620, 10, tid=7, correlation=2)]
    path = tmp_path / "rank-0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    result = trace_gaps.analyse(trace_gaps.load_events(str(path)), min_gap_us=20)
    assert (result["span_us"], result["busy_us"]) == (610, 140)
    (gap,) = result["gaps"]
    assert gap["us"] == 470 and gap["launched_by"] == "stage:optimizer / aten::add"
    assert gap["syncs"] == ["cudaStreamSynchronize"] and gap["launch_to_start_us"] == 5
    assert "idle 0.47 ms" in trace_gaps.report(result, steps=1, top=5)


@pytest.mark.gpu
def test_the_profile_summary_counts_the_triton_adamw_kernel():
    """On a GPU: one TritonAdamW step profiled inside the optimizer's stage. The summary's total
    holds its kernel's time (under ``optimizer``, or ``unattributed`` where the profiler ties the
    launch to no op) once: 80% to 125% of the step timed by CUDA events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from megamoe.kernels.adamw import TritonAdamW, triton_adamw_available
    from megamoe.training.profiling import stage_times

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    masters = [torch.randn(4096, 4096, device="cuda") for _ in range(4)]
    if not triton_adamw_available(masters):
        pytest.skip("needs Triton")
    for m in masters:
        m.grad = torch.randn_like(m)
    opt = TritonAdamW(masters, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt.step()  # the states and the chunk tables exist
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    opt.step()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("stage:optimizer"):
            opt.step()
        torch.cuda.synchronize()
    stages, kernels = stage_times(prof.events(), use_device=True)
    # and no more: the stage's span as the GPU saw it is not a kernel to count again
    assert 0.8 <= sum(stages.values()) / 1e3 / start.elapsed_time(end) <= 1.25, (stages, start.elapsed_time(end))
    assert any("adamw" in name for _, name in kernels), kernels


def test_profile_labels_a_compiled_block_as_one_stage():
    """Under --compile the stage hooks stay off a compiled block and its modules (they would be
    traced into its graph): the blocks are one stage, labelled at their call site, the rest keep
    theirs, and removing the labels leaves no hook. (``module.compile()`` compiles lazily: nothing is compiled here.)"""
    from megamoe.training.profiling import StageLabels
    from megamoe.training.train import build_model

    cfg = config_from_values(load_yaml_values(str(PRESETS / "demo.yaml")))
    model = build_model(cfg, ParallelState.single(), torch.device("cpu"))
    blocks = list(model.layers.values())
    blocks[-1].compile()

    def hooked(m):
        return bool(m._forward_pre_hooks) or any(a in vars(m) for a in ("dispatch", "_run_block"))

    labels = StageLabels(model, optimizer=type("Opt", (), {"finish_grad_sync": None, "start_clip_grad_norm": None,
                                                          "step": None})())
    assert "_run_block" in vars(model) and not any(hooked(m) for m in blocks[-1].modules())
    assert not hooked(blocks[0]) and any(hooked(m) for m in blocks[0].modules())
    labels.remove()
    assert not any(hooked(m) for m in model.modules())


def test_profile_writes_a_trace_and_a_stage_summary(tmp_path, capsys):
    """--profile on CPU: the trace of iterations 2-3 and a summary whose stages cover the MoE
    layer's parts, forward and backward, and the optimizer; the labels are gone afterwards."""
    cfg = config_from_values(load_yaml_values(str(PRESETS / "demo.yaml")))
    cfg.training.train_iters, cfg.training.eval_iters = 3, 0
    cfg.model.seq_length = 32
    cfg.logging.profile, cfg.logging.profile_step_start, cfg.logging.profile_step_end = True, 1, 3
    cfg.logging.profile_dir = str(tmp_path)
    validate(cfg, 1)
    train(cfg, ParallelState.single(), torch.device("cpu"))
    summary = (tmp_path / "summary-rank-0.txt").read_text()
    assert (tmp_path / "rank-0.json.gz").stat().st_size > 0
    assert "profile: 2 steps" in summary
    stages = {line.split("  ")[0] for line in summary.splitlines()[2:] if line and not line.startswith(" ")}
    for stage in ("attention", "attention (bwd)", "router", "dispatch", "experts", "experts (bwd)", "combine",
                  "shared experts", "mlp", "head + loss", "optimizer", "grad norm", "embedding"):
        assert stage in stages, (stage, summary)
    assert "profile of rank 0" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--profile-step-start 3 and --profile-step-end 3"):
        cfg.logging.profile_step_start = 3
        validate(cfg, 1)
