"""A layout's plan per pipeline stage: training state, activations, traffic and step time (the
layout planner, ``tools/plan_layout.py``), and a search over layouts for a GPU count.

Ranks of one pipeline stage hold the same shapes (TP, CP, EP and DP split evenly), so one rank
per stage stands for it; stages whose layers and ends are alike share one meta model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

from megamoe.config import Config, ConfigError
from megamoe.config_validation import validate
from megamoe.parallel.state import ParallelLayout, ParallelState
from megamoe.training.activation_plan import StagePlan, stage_plan, tokens_of
from megamoe.training.comm_plan import Traffic, step_traffic
from megamoe.training.memory_plan import StateBytes, stage_ranks, state_bytes
from megamoe.training.step_time import StepEstimate, estimate
from megamoe.training.train import meta_model, stage_chunks


@dataclass
class RankPlan:
    stage: int
    rank: int
    state: StateBytes
    activations: StagePlan
    traffic: list[Traffic]
    step: StepEstimate

    @property
    def peak(self) -> int:
        """Bytes at the peak: the training state and the activations' peak above it."""
        return self.state.total + self.activations.peak


def num_micro_batches(config: Config, layout: ParallelLayout) -> int:
    t = config.training
    return t.global_batch_size // (t.micro_batch_size * layout.dp)


def plan_stages(config: Config, layout: ParallelLayout, gpus_per_node: int,
                models: Optional[dict] = None) -> list[RankPlan]:
    """One plan per pipeline stage (``config`` validated for ``layout``). ``models``: meta models
    and training states already built, by stage and layout (a search shares them between
    recompute settings, which change neither)."""
    num_micro = num_micro_batches(config, layout)
    models = {} if models is None else models
    plans = []
    for stage, rank in enumerate(stage_ranks(layout)):
        state = ParallelState.without_process_groups(layout, rank)
        chunks, ends = stage_chunks(config, state)
        key = (layout.tp, layout.cp, layout.pp, layout.ep, layout.etp, layout.vpp, config.parallel.sequence_parallel,
               tuple(chunks), ends, state.is_first_stage, state.is_last_stage)
        if key not in models:
            model = meta_model(config, state)
            models[key] = (model, state_bytes(config, state, model))
        model, held = models[key]
        activations = stage_plan(config, state, num_micro, model=model)
        traffic = step_traffic(config, state, model, tokens_of(config, state), num_micro)
        step = estimate(config, model, state, layout.world_size, num_micro, traffic, gpus_per_node)
        plans.append(RankPlan(stage, rank, held, activations, traffic, step))
    return plans


# ---------------------------------------------------------------------------- search


@dataclass
class Candidate:
    flags: list[str]  # what differs from the base config, as launch flags
    config: Config
    layout: ParallelLayout
    plans: list[RankPlan]

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.plans)

    @property
    def step_seconds(self) -> float:
        return max(p.step.total for p in self.plans)


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def _stage_split(num_layers: int, pp: int) -> Optional[tuple[int, int]]:
    """(first, last) stage layer counts when ``num_layers`` does not split evenly over ``pp``:
    the middle stages take ceil(L / pp), the first and last share the rest (the first the
    larger half: it also holds the embedding, the last the head)."""
    if pp == 1 or num_layers % pp == 0:
        return None
    per = math.ceil(num_layers / pp)
    rest = num_layers - per * (pp - 2)
    if rest < 2:
        return None
    return (rest + 1) // 2, rest // 2


def candidates(base: Config, world_size: int, gpus_per_node: int) -> Iterator[tuple[list[str], Config]]:
    """Layouts to try: TP inside a node, PP over powers of two (uneven layer counts given to the
    first and last stage), EP over powers of two (all-to-all dispatcher), CP for long sequences,
    the distributed optimizer, and each recompute setting; the rest of ``base`` kept."""
    m = base.model
    experts = base.moe.num_experts or 0
    cps = [1, 2, 4] if m.seq_length >= 16384 else [1]
    recomputes = [("none", None, False), ("full", "full", False)] + ([("moe", None, True)] if experts else [])
    for tp in _powers_of_two(gpus_per_node):
        for cp in cps:
            for pp in _powers_of_two(min(m.num_layers, world_size // (tp * cp))):
                if world_size % (tp * cp * pp):
                    continue
                split = _stage_split(m.num_layers, pp)
                for ep in (_powers_of_two(min(experts, world_size // pp)) if experts else [1]):
                    if (world_size // pp) % ep:
                        continue
                    for name, granularity, moe_recompute in recomputes:
                        flags = [f"--tensor-model-parallel-size {tp}"] + (["--sequence-parallel"] if tp > 1 else [])
                        flags += [f"--pipeline-model-parallel-size {pp}"] if pp > 1 else []
                        flags += [f"--decoder-first-pipeline-num-layers {split[0]}",
                                  f"--decoder-last-pipeline-num-layers {split[1]}"] if split else []
                        flags += [f"--context-parallel-size {cp}"] if cp > 1 else []
                        flags += [f"--expert-model-parallel-size {ep}", "--expert-tensor-parallel-size 1",
                                  "--moe-token-dispatcher-type alltoall"] if experts else []
                        flags += ["--use-distributed-optimizer"]
                        flags += {"none": [], "full": ["--recompute-granularity full"],
                                  "moe": ["--moe-layer-recompute"]}[name]
                        parallel = dataclasses.replace(
                            base.parallel, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                            pipeline_model_parallel_size=pp, context_parallel_size=cp,
                            expert_model_parallel_size=ep if experts else 1,
                            expert_tensor_parallel_size=1 if experts else None,
                            decoder_first_pipeline_num_layers=split[0] if split else None,
                            decoder_last_pipeline_num_layers=split[1] if split else None,
                            virtual_pipeline_model_parallel_size=None, pipeline_schedule="1f1b",
                            pipeline_model_parallel_layout=None, use_distributed_optimizer=True)
                        # the search chooses the placement and the recomputation itself
                        model = dataclasses.replace(m, recompute_granularity=granularity, recompute_modules=["core_attn"])
                        moe = dataclasses.replace(base.moe, moe_layer_recompute=moe_recompute,
                                                  moe_token_dispatcher_type="alltoall" if experts
                                                  else base.moe.moe_token_dispatcher_type)
                        yield flags, dataclasses.replace(base, parallel=parallel, model=model, moe=moe)


def search(base: Config, world_size: int, gpus_per_node: int, gpu_memory_bytes: float,
           progress=None) -> tuple[list[Candidate], int]:
    """The valid layouts that fit ``gpu_memory_bytes`` per GPU, fastest first, and how many
    layouts were tried. ``progress(done, found)`` is called after each one."""
    fits, tried, models = [], 0, {}
    for flags, config in candidates(base, world_size, gpus_per_node):
        tried += 1
        try:
            layout = validate(config, world_size)
        except ConfigError:
            continue
        if num_micro_batches(config, layout) < 1:
            continue
        plans = plan_stages(config, layout, gpus_per_node, models)
        candidate = Candidate(flags, config, layout, plans)
        if candidate.peak <= gpu_memory_bytes:
            fits.append(candidate)
        if progress is not None:
            progress(tried, len(fits))
    return sorted(fits, key=lambda c: c.step_seconds), tried
