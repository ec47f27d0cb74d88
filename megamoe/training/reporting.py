"""What a practitioner watches: one log line per interval, tensorboard scalars and expert load.

Only the rank that holds the last pipeline stage's first TP/DP replica (global rank 0 without
pipeline parallelism) prints and writes; metrics arrive already reduced over the job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megamoe.config import Config
from megamoe.precision import PrecisionPolicy
from megamoe.training.heatmap import expert_load_heatmap, per_ep_rank_load
from megamoe.training.wandb_writer import WandbWriter, Writers


@dataclass
class StepMetrics:
    """One optimizer step, reduced over every rank."""

    iteration: int
    lm_loss: float
    lr: float
    grad_norm: float
    step_time: float
    tokens: int
    mtp_losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)  # per MoE layer, coefficient applied
    z_losses: list[float] = field(default_factory=list)
    tokens_per_expert: Optional[np.ndarray] = None  # [moe layers, experts] over the global batch
    dropped: list[float] = field(default_factory=list)
    pipeline_wait: Optional[float] = None  # this rank's seconds blocked in pipeline exchanges (when timed)
    loss_scale: Optional[float] = None  # the scale this step's loss was multiplied by (fp16, --loss-scale)
    skipped: bool = False  # the grad norm was not finite (an fp16 overflow): no update
    params_norm: Optional[float] = None  # --log-params-norm: the masters' L2 norm after the step
    num_zeros: Optional[int] = None  # --log-num-zeros-in-grad: zero elements of the step's gradient
    max_attention_logits: Optional[list[float]] = None  # per block (decoder layers, then MTP), over heads and batch
    global_batch: Optional[int] = None  # sequences in this step (a --step-batch-size-schedule's may grow)
    consumed_samples: Optional[int] = None  # after this step (set by the training loop)


class Reporter:
    """Prints Megatron-style lines and writes tensorboard (and an optional JSON-lines file)."""

    def __init__(self, config: Config, flops_per_token: float, world_size: int, is_writer: bool,
                 peak_tflops: Optional[float], device: torch.device, moe_layer_names: Optional[list[str]] = None):
        self.config, self.flops_per_token, self.world_size = config, flops_per_token, world_size
        self.policy = PrecisionPolicy.from_config(config)
        self.moe_layer_names = moe_layer_names  # heat-map row labels: each MoE layer's place in the model
        self._heatmap_unavailable = False
        self.is_writer, self.peak_tflops, self.device = is_writer, peak_tflops, device
        self.ep_size = config.parallel.expert_model_parallel_size
        self.writer = None
        self.metrics_file = None
        self._window: list[StepMetrics] = []
        writers = []
        if is_writer and config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            writers.append(SummaryWriter(log_dir=config.logging.tensorboard_dir))
        if is_writer and config.logging.wandb_project:
            writers.append(WandbWriter(config))
        if writers:
            self.writer = writers[0] if len(writers) == 1 else Writers(writers)
        if is_writer and config.logging.metrics_file:
            self.metrics_file = open(config.logging.metrics_file, "w")

    def print(self, text: str) -> None:
        if self.is_writer:
            print(text, flush=True)

    def log_step(self, m: StepMetrics) -> None:
        if not self.is_writer:
            return
        self._window.append(m)
        tokens_per_s = m.tokens / m.step_time
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        self._write_scalars(m, tokens_per_s, tflops)
        if self.metrics_file:
            record = {"iteration": m.iteration, "lm_loss": m.lm_loss, "grad_norm": m.grad_norm, "lr": m.lr,
                      "params_norm": m.params_norm, "num_zeros": m.num_zeros,
                      "loss_scale": m.loss_scale, "skipped": m.skipped,
                      "mtp_losses": m.mtp_losses, "aux_losses": m.aux_losses, "z_losses": m.z_losses,
                      "step_time": m.step_time, "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
                      "max_attention_logits": m.max_attention_logits}
            if self.device.type == "cuda":
                record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        interval = self.config.logging.log_interval
        if m.iteration % interval and m.iteration != self.config.training.train_iters:
            return
        window, self._window = self._window, []
        self.print(self._line(m, window))

    def _line(self, m: StepMetrics, window: list[StepMetrics]) -> str:
        t = self.config.training
        elapsed = sum(w.step_time for w in window) / len(window)
        tokens_per_s = sum(w.tokens for w in window) / sum(w.step_time for w in window)
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        consumed = m.consumed_samples if m.consumed_samples is not None else m.iteration * t.global_batch_size
        parts = [
            f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {m.iteration:8d}/{t.train_iters:8d}",
            f"consumed samples: {consumed}",
            f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
            f"learning rate: {m.lr:.6E}",
            f"global batch size: {m.global_batch or t.global_batch_size}",
            f"lm loss: {m.lm_loss:.5E}",
        ]
        for depth, loss in enumerate(m.mtp_losses, start=1):
            parts.append(f"mtp_{depth} loss: {loss:.5E}")
        if m.aux_losses:
            parts.append(f"load balancing loss: {sum(m.aux_losses):.5E}")
        if any(m.z_losses):
            parts.append(f"z loss: {sum(m.z_losses):.5E}")
        if m.tokens_per_expert is not None:
            load = m.tokens_per_expert
            imbalance = float((load.max(1) / np.maximum(load.mean(1), 1e-9)).max())
            parts.append(f"max/mean expert load: {imbalance:.2f}")
            if self.ep_size > 1:
                per_rank = self._per_ep_rank(load)
                rank_imbalance = float((per_rank.max(1) / np.maximum(per_rank.mean(1), 1e-9)).max())
                parts.append(f"max/mean EP-rank load: {rank_imbalance:.2f}")
            if any(m.dropped):
                parts.append(f"dropped tokens: {int(sum(m.dropped))}")
        if m.max_attention_logits:
            parts.append(f"max attention logit: {max(m.max_attention_logits):.2f}")
        if m.loss_scale is not None:  # Megatron-LM's fields
            parts += [f"loss scale: {m.loss_scale:.1f}",
                      f"number of skipped iterations: {sum(w.skipped for w in window):3d}"]
        parts.append(f"grad norm: {m.grad_norm:.4f}")
        if m.num_zeros is not None:
            parts.append(f"num zeros: {m.num_zeros}")
        if m.params_norm is not None:
            parts.append(f"params norm: {m.params_norm:.3f}")
        parts += [f"tokens/s: {tokens_per_s:,.0f}",
                  f"TFLOP/s/device: {tflops:.2f}" if tflops >= 1 else f"TFLOP/s/device: {tflops:.2g}"]
        if self.peak_tflops and self.policy.counts_toward_mfu():
            parts.append(f"MFU: {100 * tflops / self.peak_tflops:.1f}%")
        if self.device.type == "cuda":
            parts.append(f"mem peak (GiB): {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}")
        return " | ".join(parts) + " |"

    def _per_ep_rank(self, load: np.ndarray) -> np.ndarray:
        return per_ep_rank_load(load, self.ep_size)

    def _write_scalars(self, m: StepMetrics, tokens_per_s: float, tflops: float) -> None:
        w, it = self.writer, m.iteration
        if w is None:
            return
        w.add_scalar("lm-loss", m.lm_loss, it)
        w.add_scalar("learning-rate", m.lr, it)
        w.add_scalar("grad-norm", m.grad_norm, it)
        if m.global_batch is not None:
            w.add_scalar("batch-size", m.global_batch, it)
        if m.params_norm is not None:
            w.add_scalar("params-norm", m.params_norm, it)
        if m.num_zeros is not None:
            w.add_scalar("num-zeros", m.num_zeros, it)
        if m.loss_scale is not None:
            w.add_scalar("loss-scale", m.loss_scale, it)
            w.add_scalar("skipped-iteration", float(m.skipped), it)
        w.add_scalar("throughput/tokens-per-sec", tokens_per_s, it)
        w.add_scalar("throughput/tflops-per-device", tflops, it)
        if self.peak_tflops and self.policy.counts_toward_mfu():
            w.add_scalar("throughput/mfu", tflops / self.peak_tflops, it)
        if self.device.type == "cuda":
            w.add_scalar("memory/peak-allocated-GiB", torch.cuda.max_memory_allocated(self.device) / 2**30, it)
            if self.config.logging.log_memory_to_tensorboard:
                stats = torch.cuda.memory_stats(self.device)
                w.add_scalar("memory/allocated-GiB", stats.get("allocated_bytes.all.current", 0) / 2**30, it)
                w.add_scalar("memory/reserved-GiB", stats.get("reserved_bytes.all.current", 0) / 2**30, it)
                w.add_scalar("memory/peak-reserved-GiB", stats.get("reserved_bytes.all.peak", 0) / 2**30, it)
                w.add_scalar("memory/alloc-retries", stats.get("num_alloc_retries", 0), it)
        if self.config.logging.log_timers_to_tensorboard:
            w.add_scalar("timers/iteration-time", m.step_time, it)
            if m.pipeline_wait is not None:
                w.add_scalar("timers/pipeline-wait", m.pipeline_wait, it)
        for depth, loss in enumerate(m.mtp_losses, start=1):
            w.add_scalar(f"mtp-loss/depth-{depth}", loss, it)
        if m.max_attention_logits:
            w.add_scalar("attention/max-logit", max(m.max_attention_logits), it)
            layers = self.config.model.num_layers
            for i, value in enumerate(m.max_attention_logits):
                label = str(i) if i < layers else f"mtp{i - layers + 1}"
                w.add_scalar(f"attention/max-logit/layer-{label}", value, it)
        for layer, (aux, z) in enumerate(zip(m.aux_losses, m.z_losses)):
            w.add_scalar(f"moe/load-balancing-loss/layer-{layer}", aux, it)
            if z:
                w.add_scalar(f"moe/z-loss/layer-{layer}", z, it)
        if m.tokens_per_expert is not None:
            load = m.tokens_per_expert
            for layer, row in enumerate(load):
                w.add_scalar(f"moe/expert-load-max/layer-{layer}", float(row.max()), it)
                w.add_scalar(f"moe/expert-load-mean/layer-{layer}", float(row.mean()), it)
                w.add_scalar(f"moe/max-over-mean/layer-{layer}", float(row.max() / max(row.mean(), 1e-9)), it)
                w.add_histogram(f"moe/tokens-per-expert/layer-{layer}", row, it)
            for layer, dropped in enumerate(m.dropped):
                w.add_scalar(f"moe/dropped-tokens/layer-{layer}", dropped, it)
            if self.ep_size > 1:
                for layer, row in enumerate(self._per_ep_rank(load)):
                    w.add_scalar(f"moe/ep-rank-max-over-mean/layer-{layer}", float(row.max() / max(row.mean(), 1e-9)), it)
                    w.add_histogram(f"moe/tokens-per-ep-rank/layer-{layer}", row, it)
            if it % self.config.logging.moe_expert_load_image_interval == 0:
                self._write_heatmap(load, it)
        w.flush()

    def log_validation(self, loss: float, it: int) -> None:
        """The validation line (Megatron-LM's) and its tensorboard scalars."""
        ppl = float(np.exp(min(loss, 50)))
        self.print(f" validation loss at iteration {it}: lm loss value: {loss:.5E} | lm loss PPL: {ppl:.5E} |")
        if self.writer is not None:
            self.writer.add_scalar("validation/lm-loss", loss, it)
            if self.config.logging.log_validation_ppl_to_tensorboard:
                self.writer.add_scalar("validation/lm-loss-ppl", ppl, it)

    def log_timer(self, name: str, seconds: float, it: int) -> None:
        """``--log-timers-to-tensorboard``: one timed piece of work outside the iterations."""
        if self.writer is not None and self.config.logging.log_timers_to_tensorboard:
            self.writer.add_scalar(f"timers/{name}", seconds, it)

    def _write_heatmap(self, load: np.ndarray, it: int) -> None:
        if self._heatmap_unavailable:
            return
        try:
            image = expert_load_heatmap(load, self.ep_size, self.moe_layer_names, it)
        except ImportError:
            self._heatmap_unavailable = True
            self.print(" > the expert-load heat map needs matplotlib (pip install matplotlib); it is skipped")
            return
        self.writer.add_image("moe/expert-load-heatmap", image, it, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
