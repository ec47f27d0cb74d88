"""An estimated training step time for a layout, from rates this project measured.

    step = compute x (1 + pipeline bubble) + exposed communication (+ Muon's Newton-Schulz)

- compute: the model FLOPs of this GPU's share of the global batch (``flops.py``), plus what
  recomputation repeats (a forward is a third of forward + backward), at the model-FLOP rate
  megamoe reached training the V2-Lite proxy on one H200;
- the bubble of the pipeline schedule: ``(pp - 1) / m`` of the compute for 1F1B over ``m``
  micro-batches, ``(pp - 1) / (v m)`` interleaved over ``v`` virtual stages, and DualPipeV's
  ``(pp / 2 - 1) / m`` (its ``(pp/2 - 1)(F&B + B - 3W)``, taking F&B + B - 3W as about F + B);
- communication at the measured NVLink rates inside a node and at a nominal InfiniBand rate
  across nodes (not measured: no multi-node machine was available; an all-to-all's share for
  its own node stays on NVLink), all of it exposed except the share of the gradient reduction
  that ``--overlap-grad-reduce`` was measured to hide;
- with ``--optimizer muon``, Newton-Schulz on every whole matrix this rank orthogonalises, at
  the rate measured for its ``--muon-fp32-matmul-prec``.

Every rate carries its source; the estimate is as good as those single-node measurements are
for the layout asked about (kernel efficiency changes with the shapes a layout leaves per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.config import Config
from megamoe.model.args import Recompute
from megamoe.model.gpt import GPTModel
from megamoe.parallel.state import ParallelState
from megamoe.training.comm_plan import Traffic
from megamoe.training.flops import flops_per_token, recomputed_flops_per_token
from megamoe.training.muon import is_matrix, newton_schulz_flops, orthogonalising_ranks


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str


RATES = {
    "model_flops": Rate(384e12, "model FLOP/s per GPU (bf16, eager)",
                        "docs/benchmarks.md, 'One GPU against torchtitan', run 3: the V2-Lite proxy on one H200, "
                        "109,973 tokens/s x 3.492 GFLOP/token"),
    "nvlink_collective": Rate(212e9, "bytes/s per GPU (ring all-reduce bus bandwidth, NVLink)",
                              "docs/benchmarks.md, 'Overlap of the gradient reduction': 9.02 GB all-reduced in "
                              "42.5 ms on two H200s, 2 (n - 1) / n x 9.02 GB / 42.5 ms"),
    "nvlink_all_to_all": Rate(290e9, "bytes/s per GPU sent (all-to-all, NVLink)",
                              "docs/benchmarks.md, 'One MoE layer, EP 1 and 2': 403 MB of 32,768 x 6 rows of "
                              "2048 bf16 values left each GPU in 1.39 ms"),
    "internode": Rate(50e9, "bytes/s per GPU across nodes",
                      "nominal, not measured: one 400 Gb/s InfiniBand NIC per GPU at full rate"),
    # Muon's Newton-Schulz, by --muon-fp32-matmul-prec; 71.3 TFLOP for the proxy's 415 matrices
    # (muon.newton_schulz_flops)
    "newton_schulz_low": Rate(277e12, "FLOP/s (Muon's Newton-Schulz, bf16)",
                              "docs/benchmarks.md, 'Muon against AdamW': the proxy's Muon step with 'low' less "
                              "AdamW's, 0.569 - 0.312 s"),
    "newton_schulz_medium": Rate(160e12, "FLOP/s (Muon's Newton-Schulz, TF32)",
                                 "docs/benchmarks.md, 'Muon and MuonClip', the owners table: 446.1 ms at DP 1"),
    "newton_schulz_high": Rate(43e12, "FLOP/s (Muon's Newton-Schulz, float32)",
                               "docs/benchmarks.md, 'Muon against AdamW': the proxy's Muon step with 'high' less "
                               "AdamW's, 1.954 - 0.312 s"),
}
DP_OVERLAP_HIDDEN = 0.40  # of the gradient reduction, with --overlap-grad-reduce (same section: 37-41% at DP 2)


@dataclass
class StepEstimate:
    compute: float  # seconds of this GPU's FLOPs, recomputation included
    bubble: float  # seconds the pipeline schedule idles
    comm: dict[str, float]  # exposed seconds per group kind
    optimizer: float = 0.0  # Muon's Newton-Schulz (AdamW's step is left out: ~1% of a step)

    @property
    def total(self) -> float:
        return self.compute + self.bubble + sum(self.comm.values()) + self.optimizer


def bubble_fraction(config: Config, num_micro: int) -> float:
    p = config.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return 0.0
    if p.pipeline_schedule == "dualpipev":
        return (pp / 2 - 1) / num_micro
    return (pp - 1) / (vpp * num_micro)


def seconds(traffic: Traffic, gpus_per_node: int) -> float:
    """How long this GPU's share of ``traffic`` takes. A ring collective spanning nodes runs at
    the inter-node rate; an all-to-all sends to every member alike, so the share bound for its
    own node goes over NVLink while the rest crosses the network, at the same time."""
    nodes = traffic.nodes(gpus_per_node)
    if not traffic.all_to_all:
        rate = RATES["internode" if nodes > 1 else "nvlink_collective"]
        return traffic.bytes / rate.value
    n = traffic.group.size
    off_node = (n - n / nodes) / (n - 1)  # of the bytes sent to other members
    return max(traffic.bytes * off_node / RATES["internode"].value,
               traffic.bytes * (1 - off_node) / RATES["nvlink_all_to_all"].value)


def estimate(config: Config, model: GPTModel, state: ParallelState, world_size: int, num_micro: int,
             traffic: list[Traffic], gpus_per_node: int) -> StepEstimate:
    """The step time of the rank whose ``model`` (meta) and ``traffic`` are given."""
    args = model.args
    seq = config.model.seq_length
    tokens_per_gpu = config.training.global_batch_size * seq / world_size
    # the recompute settings from the config: a search shares one meta model between them
    per_token = flops_per_token(args, seq, model.padded_vocab) + recomputed_flops_per_token(
        args, seq, Recompute.of(config.model, config.moe))
    compute = per_token * tokens_per_gpu / RATES["model_flops"].value
    comm: dict[str, float] = {}
    for t in traffic:
        s = seconds(t, gpus_per_node)
        if t.kind in ("dp", "dp_cp", "edp", "embd") and config.parallel.overlap_grad_reduce:
            s *= 1 - DP_OVERLAP_HIDDEN
        comm[t.kind] = comm.get(t.kind, 0.0) + s
    return StepEstimate(compute, compute * bubble_fraction(config, num_micro), comm, muon_seconds(config, model, state))


def muon_seconds(config: Config, model: GPTModel, state: ParallelState) -> float:
    """This rank's Newton-Schulz time per step under ``--optimizer muon`` (0 otherwise): every
    whole matrix of its parameters (a TP rank orthogonalises whole gathered matrices), divided
    over the data-parallel owners with the distributed optimizer."""
    t = config.training
    if t.optimizer != "muon":
        return 0.0
    distributed = config.parallel.use_distributed_optimizer
    flops = sum(newton_schulz_flops(p, t.muon_num_ns_steps) / orthogonalising_ranks(p, state, distributed)
                for p in model.parameters() if is_matrix(p))
    return flops / RATES[f"newton_schulz_{t.muon_fp32_matmul_prec}"].value
