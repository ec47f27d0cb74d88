"""The training loop: micro-batches, gradient accumulation, reductions, clipping, AdamW,
expert-bias updates, evaluation and reporting.

Loss normalisation (layout-invariant): the language-model loss of a step is the mean over
every token of the global batch, so each micro-batch contributes ``loss_sum / global_tokens``
and gradients are summed (not averaged) across data-parallel ranks. The MTP loss is the same
per depth, averaged over depths and scaled by ``--mtp-loss-scaling-factor``. Balancing and
z-losses are per micro-batch, so each contributes ``1 / (micro_batches * dp)``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch

from megamoe.config import Config
from megamoe.data.loader import build_data_source, with_tokenizer_vocab
from megamoe.eager import disable_marked_for_compile
from megamoe.model.args import gpt_args
from megamoe.model.gpt import GPTModel, LossWeights, ModelOutput, materialize
from megamoe.parallel import mappings
from megamoe.parallel.pipeline_parallel import (
    P2P,
    build_schedule,
    run_schedule,
    v_stage_layer_ranges,
    virtual_stage_layer_ranges,
)
from megamoe.parallel.pieces import PieceRun
from megamoe.parallel.pipeline_layout import PipelineLayout
from megamoe.parallel.random import RNGStatesTracker, model_parallel_seed
from megamoe.parallel.state import ParallelState
from megamoe.parallel.weight_grad import WeightGradStore
from megamoe.precision import PrecisionPolicy
from megamoe.batch_schedule import BatchSchedule
from megamoe.training.flops import flops_per_token, peak_tflops
from megamoe.training.manual_gc import ManualGC
from megamoe.training.prefetch import StepPrefetcher
from megamoe.training.distributed_optimizer import DistributedOptimizer
from megamoe.training.distributed_muon import DistributedMuon
from megamoe.training.muon import MixedPrecisionMuon
from megamoe.training.optimizer import MixedPrecisionAdamW, Optimizer
from megamoe.training.profiling import StepProfiler
from megamoe.training.qk_clip import layer_max_logits, qk_clip_edit, start_tracking, take_max_logits
from megamoe.training.reporting import Reporter, StepMetrics
from megamoe.training.schedule import learning_rate
from megamoe.training.stopping import ExitConditions, check_finite
from megamoe.training.to_host import copy_to_host

log = logging.getLogger(__name__)


def build_model(config: Config, state: ParallelState, device: torch.device | str,
                dtype: Optional[torch.dtype] = None) -> GPTModel:
    """This rank's part of the model: built on the meta device, materialised on ``device``,
    then initialised (layout-invariant). ``dtype`` defaults to the precision policy's."""
    model = materialize(meta_model(config, state, dtype), device)
    model.init_weights(config.training.seed)
    # DualPipeV's W actions run the deferred weight gradients; --delay-wgrad-compute runs them
    # after each piece's backward
    if _v_placement(config, state) or config.moe.delay_wgrad_compute:
        model.defer_weight_grads(WeightGradStore())
    if config.training.compile:
        compile_blocks(model, torch.device(device))
    return model


def _v_placement(config: Config, state: ParallelState) -> bool:
    """Whether this job runs DualPipeV's V placement (one process runs the whole model)."""
    return config.parallel.pipeline_schedule == "dualpipev" and state.pp.size > 1


def stage_chunks(config: Config, state: ParallelState) -> tuple[list[tuple[int, int]], Optional[tuple]]:
    """This rank's model chunks (``[start, end)`` decoder-layer ranges) and the chunks holding the
    model's ends (None: the loop placement's; see ``GPTModel``)."""
    p = config.parallel
    if p.pipeline_model_parallel_layout is not None:
        return PipelineLayout.parse(p.pipeline_model_parallel_layout).ranges(state.pp.size)[state.pp.rank], None
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if _v_placement(config, state):  # the V: rank 0 holds the first and the last stage
        chunks = v_stage_layer_ranges(config.model.num_layers, state.pp.size, first, last)[state.pp.rank]
        return chunks, ((0, 1) if state.pp.rank == 0 else (None, None))
    return virtual_stage_layer_ranges(config.model.num_layers, state.pp.size, state.layout.vpp or 1,
                                      first, last)[state.pp.rank], None


def meta_model(config: Config, state: ParallelState, dtype: Optional[torch.dtype] = None) -> GPTModel:
    """This rank's part of the model on the meta device: its shapes without memory (the layout
    planner sizes every rank's state from it)."""
    policy = PrecisionPolicy.from_config(config)
    if dtype is None:
        dtype = policy.params_dtype
    args = gpt_args(config)
    p = config.parallel
    chunks, ends = stage_chunks(config, state)
    with torch.device("meta"):
        return GPTModel(args, state, chunks, sequence_parallel=p.sequence_parallel, dtype=dtype,
                        fp8_layers=policy.fp8_layers(args.num_layers, args.num_blocks), ends=ends)


def compile_blocks(model: GPTModel, device: torch.device) -> None:
    """``--compile``: torch.compile every transformer block in place (parameters and names stay
    as they are). Eager elsewhere than CUDA, where Inductor's CPU path would compile for minutes
    on a small test machine."""
    if device.type != "cuda":
        log.warning("--compile: torch.compile is used on CUDA only; this %s run stays eager", device.type)
        return
    disable_marked_for_compile()
    for block in [*model.layers.values(), *(mtp.block for mtp in model.mtp)]:
        block.compile()


def build_optimizer(model: GPTModel, config: Config, state: ParallelState) -> Optimizer:
    """AdamW with float32 masters: sharded over data-parallel ranks with
    ``--use-distributed-optimizer``, else whole on every rank; or Muon (``--optimizer muon``);
    with the policy's loss scaler."""
    if config.training.optimizer == "muon":
        kind = DistributedMuon if config.parallel.use_distributed_optimizer else MixedPrecisionMuon
    else:
        kind = DistributedOptimizer if config.parallel.use_distributed_optimizer else MixedPrecisionAdamW
    sharded = {"fp8_param_gather": config.model.fp8_param_gather} if config.parallel.use_distributed_optimizer else {}
    optimizer = kind(model, config.training, state, config.parallel, **sharded)
    optimizer.loss_scaler = PrecisionPolicy.from_config(config).loss_scaler()
    return optimizer


class MicroBatches:
    """Which samples each rank reads: Megatron's order. Micro-step ``j`` of step ``it`` (0-based)
    gives data-parallel rank ``d`` samples ``C + j*m*dp + d*m ... + m`` (C the samples consumed
    before the step, ``it*G`` at a constant global batch G; m the micro batch) of ``split``
    ('train' or 'valid'): mock data, or the datasets of --data-path. Training steps follow the
    batch schedule (``--step-batch-size-schedule``); evaluation reads global batches of
    ``--global-batch-size``."""

    def __init__(self, config: Config, state: ParallelState, device: torch.device, split: str = "train"):
        t = config.training
        self.data = build_data_source(config, split)
        self.micro, self.global_batch = t.micro_batch_size, t.global_batch_size
        self.dp, self.dp_rank, self.device = state.dp.size, state.dp.rank, device
        self.schedule = BatchSchedule.of(config) if split == "train" else BatchSchedule.constant(t.global_batch_size)
        self.num_micro = self.global_batch // (self.micro * self.dp)  # at --global-batch-size
        self.origin = (0, 0)  # (steps, samples consumed) the run starts from: a resumed run's checkpoint

    def consumed_before(self, step: int) -> int:
        """Samples consumed before 0-based step ``step``."""
        steps, samples = self.origin
        return self.schedule.consumed_after(step - steps, start=samples)

    def num_micro_of(self, step: int) -> int:
        """Micro-batches per data-parallel rank in 0-based step ``step``."""
        return self.schedule.batch_at(self.consumed_before(step)) // (self.micro * self.dp)

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        start = self.consumed_before(step) + micro_step * self.micro * self.dp + self.dp_rank * self.micro
        return self.data.batch(list(range(start, start + self.micro)), self.device)


def _micro_batch_counts(data: MicroBatches) -> str:
    """The micro-batches per step per data-parallel rank, or how a batch schedule grows them."""
    counts = [batch // (data.micro * data.dp) for batch in dict.fromkeys(data.schedule.sizes)]
    return str(counts[0]) if len(counts) == 1 else " -> ".join(map(str, counts)) + " (the batch schedule)"


def _global_token_counts(batches, mtp_depths: int, state: ParallelState) -> torch.Tensor:
    """[1 + depths] loss-token counts over the global batch: main loss, then each MTP depth.
    Batches hold whole sequences (the model shards them over CP), so this sums over DP only."""
    counts = torch.zeros(1 + mtp_depths, dtype=torch.float64, device=batches[0]["loss_mask"].device)
    for b in batches:
        mask = b["loss_mask"].double()
        counts[0] += mask.sum()
        for k in range(1, mtp_depths + 1):
            counts[k] += mask[:, k:].sum()
    return mappings.all_reduce_(counts, state.dp)


def train_step(model: GPTModel, optimizer: Optimizer, batches: list[dict], step: int,
               config: Config, state: ParallelState, rng_tracker: Optional[RNGStatesTracker],
               time_pipeline: bool = False) -> StepMetrics:
    """One optimizer step over this rank's micro-batches; returns metrics reduced over the job.
    ``step_time`` covers this function; the loop replaces it with the wall time between steps.
    ``time_pipeline`` (benchmarks) measures this rank's time blocked in pipeline exchanges."""
    start = time.perf_counter()
    t, depths = config.training, config.model.mtp_num_layers
    # Balancing losses: the TP x CP ranks of a micro-batch hold shares that sum to its loss.
    num_micro, dp = len(batches), state.dp.size
    counts = _global_token_counts(batches, depths, state)
    device = counts.device
    optimizer.zero_grad(num_micro)  # knowing the count lets --overlap-grad-reduce start buckets early
    track_logits = t.qk_clip or config.logging.log_max_attention_logit
    if track_logits:
        start_tracking(model)
    scaler = optimizer.loss_scaler
    loss_scale = scaler.scale if scaler is not None else 1.0
    # Metrics, summed over micro-batches. MoE rows are indexed by the global MoE-layer ordinal,
    # so the pipeline stages' rows can be summed over the pipeline group.
    sums = torch.zeros(1 + depths, dtype=torch.float64, device=device)
    aux = torch.zeros(2, model.num_moe_layers, dtype=torch.float64, device=device)
    load = torch.zeros(model.num_moe_layers, config.moe.num_experts or 0, dtype=torch.float64, device=device)
    dropped = torch.zeros(model.num_moe_layers, dtype=torch.float64, device=device)

    # each loss's gradient (every stage's losses are scaled, so the gradients between stages agree)
    weights = LossWeights(lm=loss_scale / counts[0],
                          mtp=[loss_scale * config.model.mtp_loss_scaling_factor / depths / counts[k]
                               for k in range(1, depths + 1)],
                          balance=loss_scale / (num_micro * dp))

    @torch.no_grad()
    def record(out: ModelOutput) -> None:
        if out.lm_loss_sum is not None:
            sums[0] += out.lm_loss_sum.double()
            for k, mtp_sum in enumerate(out.mtp_loss_sums, start=1):
                sums[k] += mtp_sum.double()
        for i, stats in zip(out.moe_index, out.moe_stats):
            aux[0, i] += stats.aux_loss.double()
            aux[1, i] += stats.z_loss.double()
            load[i] += stats.tokens_per_expert.double()
            dropped[i] += stats.num_dropped.double()

    def forward_step(j: int, hidden_in: Optional[torch.Tensor], chunk: int = 0):
        batch = batches[j]
        out = model(batch["tokens"], batch["labels"], batch["loss_mask"], rng_tracker, hidden_in=hidden_in,
                    chunk=chunk)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        for stats in out.moe_stats:
            loss = loss + (stats.aux_loss + stats.z_loss) * weights.balance
        if out.lm_loss_sum is not None:
            loss = loss + out.lm_loss_sum * weights.lm
            for mtp_sum, weight in zip(out.mtp_loss_sums, weights.mtp):
                loss = loss + mtp_sum * weight
        record(out)
        return out.hidden, loss

    def piece_step(j: int, hidden_in: Optional[torch.Tensor], chunk: int) -> PieceRun:
        """``forward_step`` as pieces (--overlap-moe-expert-parallel-comm); metrics once it ran."""
        batch = batches[j]
        run = model.piece_run(batch["tokens"], batch["labels"], batch["loss_mask"], rng_tracker, hidden_in, chunk,
                              weights)
        run.on_forward_done = lambda done: record(model.piece_output(done, chunk))
        if config.moe.delay_wgrad_compute:
            run.delay_weight_grads = model.wgrad_store
        return run

    overlap = config.moe.overlap_moe_expert_parallel_comm
    p2p = P2P(state.pp, _activation_shape(config, state), next(model.parameters()).dtype, device,
              timed=time_pipeline)
    if state.pp.size == 1 and not overlap:
        for j in range(num_micro):
            forward_step(j, None)[1].backward()
    else:  # a pipeline, or one stage's forwards interleaved with the previous micro-batch's backwards
        placement, actions = build_schedule(config.parallel.pipeline_schedule, state.pp.size, state.pp.rank,
                                            num_micro, state.layout.vpp or 1, paired=overlap)
        run_schedule(actions, placement, forward_step, p2p, wgrad_store=model.wgrad_store,
                     piece_step=piece_step if overlap else None)

    optimizer.finish_grad_sync()
    # Reduce the metrics: loss shares over TP, sums over data-parallel ranks and pipeline stages.
    # Loss sums and aux shares are split over CP ranks; expert loads are whole on each of them.
    mappings.all_reduce_(aux, state.tp)
    packed = torch.cat([sums, aux.flatten(), load.flatten(), dropped])
    mappings.all_reduce_(packed, state.dp_cp)
    mappings.all_reduce_(packed, state.pp)

    def unpack(flat):  # sums, aux, load and dropped from the reduced metrics (on either side)
        rest = flat[1 + depths:]
        return (flat[: 1 + depths], rest[: aux.numel()].view_as(aux) / (num_micro * dp),
                rest[aux.numel(): aux.numel() + load.numel()].view_as(load) / state.cp.size,
                rest[aux.numel() + load.numel():] / state.cp.size)

    # ... and start their copy to the host now: the grad norm's read below waits for it, and the
    # host then logs and launches the next step while the optimizer's update runs (waiting for
    # the whole step left the GPU idle for the host's work between two steps).
    on_host, copied = copy_to_host(torch.cat([counts, sums[:1], packed]))  # sums[:1]: this rank's loss
    pending_norm = optimizer.start_clip_grad_norm(t.clip_grad, loss_scale)
    num_zeros = optimizer.grad_zeros() if config.logging.log_num_zeros_in_grad else None
    # Megatron-LM's schedule advances only on the steps taken
    lr = learning_rate(step - (scaler.skipped if scaler is not None else 0), t, BatchSchedule.of(config))
    maxima = take_max_logits(model, state) if track_logits else {}
    # A step that skips itself on a non-finite norm goes first: the host reads the norm while
    # the update runs instead of idling the GPU between the read and the launch. qk-clip edits
    # the masters after the update, so it waits for the norm.
    stepped = optimizer.skips_on_device and not t.qk_clip
    if stepped:
        optimizer.step(lr)
    grad_norm = pending_norm.read()
    # A non-finite norm never updates the weights (the norm is the same on every rank, so they
    # all skip; a step that went first left them as they were): an overflow under the dynamic
    # loss scale lowers the scale, and with --check-for-nan-in-loss-and-grad any other stops the run.
    skipped = not math.isfinite(grad_norm)
    overflowed = skipped and scaler is not None and scaler.dynamic
    if t.check_for_nan_in_loss_and_grad and skipped and not overflowed:
        mine_bad = any(not bool(torch.isfinite(g).all()) for _, g in optimizer.grad_pieces())
        check_finite("grad norm", grad_norm, step, mine_bad, state, device)
    if skipped:
        optimizer.skip_step()
    elif not stepped:
        optimizer.step(lr, qk_clip_edit(maxima, t) if t.qk_clip else None)
    if scaler is not None:
        scaler.update(overflowed)
    load_on_device = unpack(packed)[2]
    for layer, i in zip(model.moe_layers(), model.moe_index):
        if not skipped:  # a skipped step changes nothing in the model
            layer.gate.update_expert_bias(load_on_device[i].float())
    if copied is not None:
        copied.synchronize()
    counts, my_loss_sum = on_host[: 1 + depths], on_host[1 + depths]
    sums, aux, load, dropped = unpack(on_host[2 + depths:])
    lm_loss = (sums[0] / counts[0]).item()
    if t.check_for_nan_in_loss_and_grad:
        check_finite("lm loss", lm_loss, step, not math.isfinite(my_loss_sum.item()), state, device)
    return StepMetrics(
        iteration=step,
        lm_loss=lm_loss,
        lr=lr,
        grad_norm=grad_norm,
        step_time=time.perf_counter() - start,
        tokens=num_micro * dp * t.micro_batch_size * config.model.seq_length,
        global_batch=num_micro * dp * t.micro_batch_size,
        mtp_losses=[(sums[k] / counts[k]).item() for k in range(1, depths + 1)],
        aux_losses=aux[0].tolist(),
        z_losses=aux[1].tolist(),
        tokens_per_expert=load.cpu().numpy() if model.num_moe_layers else None,
        dropped=dropped.tolist(),
        pipeline_wait=p2p.wait_seconds if time_pipeline else None,
        loss_scale=loss_scale if scaler is not None else None,  # the one this step's loss used
        skipped=skipped,
        params_norm=optimizer.params_norm() if config.logging.log_params_norm else None,
        num_zeros=num_zeros,
        max_attention_logits=layer_max_logits(model, maxima, state) if track_logits else None,
    )


def resume(config: Config, model: GPTModel, optimizer: Optimizer, data: MicroBatches, state: ParallelState,
           rng_tracker: RNGStatesTracker, device: torch.device, say) -> tuple[int, RNGStatesTracker]:
    """``--load``: the iteration to continue after (0 for a fresh start or ``--finetune``) and
    the RNG tracker to use. The RNG streams of another layout cannot carry over: the run says
    so and re-seeds them from ``--seed`` and the iteration, the same way on every rerun."""
    ckpt = config.checkpoint
    if not ckpt.load:
        return 0, rng_tracker
    from megamoe.training.checkpoint import load_checkpoint  # here: see train()
    fresh_optimizer = ckpt.no_load_optim or ckpt.finetune
    want_rng = not (ckpt.no_load_rng or ckpt.finetune)
    loaded = load_checkpoint(ckpt.load, model, optimizer, state, config, rng_tracker, device,
                             load_optim=not fresh_optimizer, load_rng=want_rng)
    if loaded is None:
        say(f"> no checkpoint in {ckpt.load} yet: training from scratch")
        return 0, rng_tracker
    what = "weights" if fresh_optimizer else "weights and optimizer"
    if ckpt.finetune:
        say(f"> --finetune: loaded the weights of iteration {loaded.iteration} from {ckpt.load}; starting at 0")
        return 0, rng_tracker
    start = loaded.iteration
    data.origin = (start, loaded.consumed_samples)  # the schedule goes on from the samples consumed
    say(f"> loaded {what} of iteration {start} from {ckpt.load} ({loaded.consumed_samples:,} samples consumed)")
    if want_rng and not loaded.rng_restored:
        say("> the checkpoint was written in another layout: its RNG streams do not carry over; "
            f"re-seeded from --seed {config.training.seed} and iteration {start}")
        rng_tracker = model_parallel_seed(config.training.seed + start, state, device)
    return start, rng_tracker


def moe_layer_names(args) -> list[str]:
    """Each MoE layer's label in the logs: its decoder layer index, or ``mtpK`` for MTP depth K."""
    return [str(i) if i < args.num_layers else f"mtp{i - args.num_layers + 1}"
            for i, moe in enumerate(args.moe_layers) if moe]


def _activation_shape(config: Config, state: ParallelState) -> tuple[int, int, int]:
    """[s, micro_batch, hidden] between pipeline stages (s / cp, then / tp with sequence parallel)."""
    s = config.model.seq_length // state.cp.size
    if config.parallel.sequence_parallel:
        s //= state.tp.size
    return (s, config.training.micro_batch_size, config.model.hidden_size)


@torch.no_grad()
def evaluate(model: GPTModel, data: MicroBatches, config: Config, state: ParallelState) -> float:
    """Mean validation lm loss over the first ``--eval-iters`` global batches of the validation data."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=data.device)
    for it in range(config.training.eval_iters):
        batches = [data.get(it, j) for j in range(data.num_micro)]

        def forward_step(j: int, hidden_in: Optional[torch.Tensor], chunk: int = 0):
            b = batches[j]
            out = model(b["tokens"], b["labels"], b["loss_mask"], hidden_in=hidden_in, chunk=chunk)
            if out.lm_loss_sum is not None:
                total.add_(torch.stack([out.lm_loss_sum.double(), out.num_tokens.double()]))
            return out.hidden, None

        p2p = P2P(state.pp, _activation_shape(config, state), next(model.parameters()).dtype, data.device)
        placement, actions = build_schedule(config.parallel.pipeline_schedule, state.pp.size, state.pp.rank,
                                            data.num_micro, state.layout.vpp or 1, train=False)
        run_schedule(actions, placement, forward_step, p2p, train=False)
    model.train()
    mappings.all_reduce_(total, state.dp_cp)
    mappings.all_reduce_(total, state.pp)
    return (total[0] / total[1]).item()


def train(config: Config, state: ParallelState, device: torch.device) -> list[StepMetrics]:
    """Build everything and run ``--train-iters`` steps; returns the per-step metrics."""
    config = with_tokenizer_vocab(config)  # real data: the model's vocabulary is the tokenizer's
    rng_tracker = model_parallel_seed(config.training.seed, state, device)
    model = build_model(config, state, device)
    model.train()
    optimizer = build_optimizer(model, config, state)
    data = MicroBatches(config, state, device)
    valid_data = MicroBatches(config, state, device, "valid") if config.training.eval_iters else None
    fpt = flops_per_token(model.args, config.model.seq_length, model.padded_vocab)
    is_writer = state.rank == 0
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    reporter = Reporter(config, fpt, state.layout.world_size, is_writer, peak, device, moe_layer_names(model.args))
    n_params = sum(p.numel() for p in model.parameters())
    reporter.print(f"> model: {n_params:,} parameters on rank 0; {fpt / 1e9:.3f} GFLOPs per token (fwd+bwd); "
                   f"{_micro_batch_counts(data)} micro-batches of {data.micro} per step per data-parallel rank")
    if config.logging.tensorboard_dir:
        reporter.print(f"> tensorboard: {config.logging.tensorboard_dir}")
    history = []
    t, ckpt = config.training, config.checkpoint
    profiler = StepProfiler(config, state.rank, model, optimizer, device, reporter.print)
    start, rng_tracker = resume(config, model, optimizer, data, state, rng_tracker, device, reporter.print)

    # torch.distributed.checkpoint costs 1.4 s of imports per process: only runs that save load it
    if ckpt.save:
        from megamoe.training.checkpoint import AsyncSaver, remove_old_checkpoints, save_checkpoint
    saver = AsyncSaver(state, device) if ckpt.save and ckpt.async_save else None

    def saved(path: Optional[str], began: float, step: int) -> None:
        """Report a finished save (``step``: the iteration at which it is seen finished)."""
        if path is None:
            return
        seconds = time.perf_counter() - began
        reporter.print(f"> saved checkpoint {path} ({seconds:.1f} s)")
        reporter.log_timer("save-checkpoint", seconds, step)
        if ckpt.ckpt_keep_latest and state.rank == 0:
            for old in remove_old_checkpoints(ckpt.save, ckpt.ckpt_keep_latest):
                reporter.print(f"> removed {old} (--ckpt-keep-latest {ckpt.ckpt_keep_latest})")

    def save(step: int) -> None:
        optimizer.finish_param_sync()
        began = time.perf_counter()
        consumed = data.consumed_before(step)
        if saver is None:
            saved(save_checkpoint(ckpt.save, step, model, optimizer, state, config, consumed, rng_tracker, device),
                  began, step)
            return
        saved(saver.wait(), saver.started_at, step)  # one save in flight at a time
        saver.start(ckpt.save, step, model, optimizer, config, consumed, rng_tracker)
        reporter.print(f"> async save of iteration {step} started: training blocked "
                       f"{time.perf_counter() - began:.2f} s for the copy to {saver.snapshot.where}")

    exits = ExitConditions(ckpt, state, device)

    def step_batches(step: int) -> list[dict]:
        return [data.get(step - 1, j) for j in range(data.num_micro_of(step - 1))]

    # The next steps' batches are prepared by --num-workers threads while this step computes.
    # Step times are wall-clock from one step's end to the next, so data waits are counted.
    with StepPrefetcher(step_batches, start + 1, t.train_iters, config.data.num_workers) as prefetch, \
            ManualGC(t) as collector:
        last = time.perf_counter()
        for step in range(start + 1, t.train_iters + 1):
            batches = prefetch.get(step)
            profiler.before_step(step)
            metrics = train_step(model, optimizer, batches, step, config, state, rng_tracker)
            profiler.after_step(step)
            now = time.perf_counter()
            metrics.step_time, last = now - last, now
            metrics.consumed_samples = data.consumed_before(step)
            reporter.log_step(metrics)
            history.append(metrics)
            collector.after_step(step)
            if t.eval_iters and ((t.eval_interval and step % t.eval_interval == 0) or step == t.train_iters):
                collector.around_evaluation()
                began = time.perf_counter()
                valid = evaluate(model, valid_data, config, state)
                reporter.log_timer("evaluate", time.perf_counter() - began, step)
                collector.around_evaluation()
                reporter.log_validation(valid, step)
                last = time.perf_counter()
            stop = exits.reason(step)
            due = step == t.train_iters or (ckpt.save_interval and step % ckpt.save_interval == 0)
            if ckpt.save and (due or stop):
                save(step)
                last = time.perf_counter()
            if saver is not None:
                saved(saver.poll(), saver.started_at, step)
            if stop:
                reporter.print(f"> exiting after iteration {step}: {stop}")
                break
    if saver is not None:
        saved(saver.wait(), saver.started_at, len(history) + start)
        saver.close()
    optimizer.finish_param_sync()
    reporter.close()
    return history
