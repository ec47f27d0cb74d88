"""The bytes each GPU sends per training step, by parallel group, predicted from the layout.

Counted as the ring algorithms move them, per GPU: an all-gather or a reduce-scatter of a
tensor of ``S`` bytes over ``n`` ranks sends ``(n - 1) / n x S``, an all-reduce twice that, an
all-to-all the share of its rows bound for other ranks. Per micro-batch and layer on this rank
(``T`` its tokens, activations in the parameters' dtype, routing balanced):

- **TP**: each TP region gathers its input and reduce-scatters its output (sequence parallel),
  or all-reduces the output and, in backward, the input's gradient (without): either way
  ``2 (n - 1) / n x T x (in + out)`` forward and backward together. Attention's region takes the
  hidden state (GQA) or MLA's latents, dense MLPs and shared experts the hidden state; routed
  experts see their own tokens (without sequence parallel their output is all-gathered); the
  vocab-parallel embedding's output and each head's input cross too.
- **EP**: the all-to-all dispatcher sends ``(ep - 1) / ep`` of each layer's ``K`` rows per token
  out and back, in forward and in backward; expert-TP copies the rows to its ``etp - 1``
  partners. The all-gather dispatcher gathers the tokens (with their routing) over
  ``etp x ep`` and reduce-scatters the combine.
- **CP**: the ring passes each rank's keys and values (MLA: latent and rope key) ``cp - 1``
  times forward and again in backward, where their float32 gradient accumulators travel
  ``cp`` steps back to their owners; the all-gather exchange gathers them forward and
  reduce-scatters their gradients.
- **PP**: every send of the schedule's action list (``SEND_F``, ``SEND_B``): one micro-batch's
  residual stream.
- **DP**: every gradient buffer (``memory_plan``'s arithmetic): float32 gradients all-reduced,
  or reduce-scattered with the parameters all-gathered (``--use-distributed-optimizer``), over
  DP x CP for dense weights and expert-DP for experts; sequence-parallel partial gradients are
  first summed over TP. Muon (``--optimizer muon``) adds the all-gathers of TP- and
  expert-TP-cut matrices' updates, and with the distributed optimizer the exchange of each
  shard's updates with their owners (``distributed_muon.py``).

Recomputation repeats the forward's TP, EP and CP traffic of what it recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.config import Config
from megamoe.model.args import Recompute
from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.gpt import GPTModel
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.moe import MoELayer
from megamoe.parallel.expert_parallel import AllToAllDispatcher
from megamoe.parallel.pipeline_parallel import build_schedule
from megamoe.parallel.param_spec import spec_of
from megamoe.parallel.state import Group, ParallelState
from megamoe.training.activation_plan import FP32, Tokens
from megamoe.training.memory_plan import master_size, planned_buffers
from megamoe.training.muon import is_matrix, orthogonalising_ranks


@dataclass(frozen=True)
class Traffic:
    """What this GPU sends over one group per step."""

    kind: str  # tp, ep, etp, etp_ep, cp, pp, and the gradient buffers' groups (dp_cp, edp, ...)
    what: str
    group: Group
    bytes: float
    all_to_all: bool = False  # an all-to-all (its rate differs from the ring collectives')

    def nodes(self, gpus_per_node: int) -> int:
        """Nodes the group spans (1: it stays inside one)."""
        return len({rank // gpus_per_node for rank in self.group.ranks})


def _ring(n: int) -> float:
    return (n - 1) / n


def _attention_region(attn, d: int) -> tuple[int, int]:
    """(values per token entering, leaving) attention's TP region."""
    if isinstance(attn, MultiHeadLatentAttention):
        q_in = attn.wq_b.weight.shape[1] if hasattr(attn, "wq_b") else d
        return q_in + attn.kv_lora_rank + attn.rope_dim, d
    return d, d


def _kv_values(attn) -> int:
    """Values per token that context parallelism exchanges (this TP rank's heads)."""
    if isinstance(attn, MultiHeadLatentAttention):
        if attn.cp_exchange == "latent":
            return attn.kv_lora_rank + attn.rope_dim
        return attn.num_local_heads * (attn.nope_dim + attn.rope_dim + attn.v_dim)
    assert isinstance(attn, GroupedQueryAttention)
    return 2 * attn.num_local_kv * attn.head_dim


def step_traffic(config: Config, state: ParallelState, model: GPTModel, t: Tokens, num_micro: int) -> list[Traffic]:
    """This rank's traffic per training step, one entry per group and purpose."""
    recompute = Recompute.of(config.model, config.moe)
    passes = 3 if recompute.full else 2  # forward, backward, and the recomputed forward
    blocks = list(model.layers.values()) + [m.block for m in model.mtp]
    tp, cp, ep, etp = state.tp, state.cp, state.ep, state.etp
    a, d = t.act, model.args.hidden_size
    out: list[Traffic] = []
    tp_bytes = ep_bytes = etp_bytes = cp_bytes = 0.0
    for block in blocks:
        moe = block.ffn if isinstance(block.ffn, MoELayer) else None
        moe_passes = passes + (1 if moe is not None and recompute.moe and not recompute.full else 0)
        if tp.size > 1:
            region_in, region_out = _attention_region(block.attn, d)
            tp_bytes += passes * _ring(tp.size) * t.full * a * (region_in + region_out)
            # an MLP's region (the dense MLP, or the shared experts'), once more where it is recomputed alone
            if moe is None:
                mlp_passes = passes + int(recompute.mlp_alone)
            else:
                mlp_passes = moe_passes + int(recompute.shared_experts_alone)
            mlp = 2 * d if moe is None or moe.shared_experts is not None else 0
            routed = d if moe is not None and not t.sp else 0  # the routed experts' output, all-gathered over TP
            tp_bytes += _ring(tp.size) * t.full * a * (mlp_passes * mlp + moe_passes * routed)
        if cp.size > 1:
            kv = _kv_values(block.attn) * t.full * a
            if block.attn.cp_comm_type == "p2p":
                # around the ring in each forward and again in backward, where the float32
                # gradient accumulators follow the blocks all the way back to their owners
                cp_bytes += (cp.size - 1) * kv * passes + cp.size * kv * FP32 / a
            else:
                cp_bytes += _ring(cp.size) * cp.size * kv * passes
        if moe is not None:
            rows = moe.gate.topk * t.routed * d * a  # rows leaving this rank's tokens, per direction
            if isinstance(moe.dispatcher, AllToAllDispatcher):
                ep_bytes += 2 * moe_passes * _ring(ep.size) * rows  # dispatch and combine
                etp_bytes += 2 * moe_passes * (etp.size - 1) * rows
            else:  # the tokens with their routing (float32 probabilities, int64 experts)
                n = etp.size * ep.size
                ep_bytes += moe_passes * (n - 1) * t.routed * (2 * d * a + moe.gate.topk * (FP32 + 8))
    if tp.size > 1:  # the embedding's output and the heads' input cross the TP region's edge too
        edges = int(model.first_stage) + (1 + len(model.mtp)) * int(model.last_stage) + len(model.mtp)
        tp_bytes += edges * 2 * _ring(tp.size) * t.full * a * d
    total = num_micro
    if tp_bytes:
        out.append(Traffic("tp", "attention and MLP inputs and outputs", tp, tp_bytes * total))
    if cp_bytes:
        out.append(Traffic("cp", "attention keys and values", cp, cp_bytes * total))
    if ep_bytes:
        alltoall = config.moe.moe_token_dispatcher_type == "alltoall"
        out.append(Traffic("ep" if alltoall else "etp_ep", "expert rows out and back", ep if alltoall else state.etp_ep,
                           ep_bytes * total, all_to_all=alltoall))
    if etp_bytes:
        out.append(Traffic("etp", "expert rows to the expert-TP partners", etp, etp_bytes * total, all_to_all=True))
    out += _pipeline_traffic(config, state, t, num_micro)
    out += _gradient_traffic(config, state, model)
    return out


def _pipeline_traffic(config: Config, state: ParallelState, t: Tokens, num_micro: int) -> list[Traffic]:
    if state.pp.size == 1:
        return []
    _, actions = build_schedule(config.parallel.pipeline_schedule, state.pp.size, state.pp.rank, num_micro,
                                state.layout.vpp or 1, paired=config.moe.overlap_moe_expert_parallel_comm)
    sends = sum(1 for a in actions if a.kind in ("SEND_F", "SEND_B"))
    hidden = config.model.hidden_size
    return [Traffic("pp", "activations forward, their gradients back", state.pp, sends * t.stream * hidden * t.act)]


def _gradient_traffic(config: Config, state: ParallelState, model: GPTModel) -> list[Traffic]:
    params = [p for p in model.parameters() if p.requires_grad]
    distributed = config.parallel.use_distributed_optimizer
    muon = config.training.optimizer == "muon"
    out = _muon_gathers(params, state, distributed) if muon else []
    for buf in planned_buffers(config, params, state):
        name, group, pre_group, padded, dtype = buf.name, buf.group, buf.pre_group, buf.padded, buf.dtype
        grad_size = master_size(dtype)
        if pre_group is not None and pre_group.size > 1:
            out.append(Traffic(pre_group.name, f"{name}: partial gradients summed", pre_group,
                               2 * _ring(pre_group.size) * padded * grad_size))
        if group.size == 1:
            continue
        if distributed:
            gathered_size = 1 if name.endswith("_fp8") else dtype.itemsize  # --fp8-param-gather: e4m3 bytes
            sent = _ring(group.size) * padded * (grad_size + gathered_size)
            what = f"{name}: gradients reduce-scattered, parameters all-gathered" + (" in FP8" if gathered_size == 1 else "")
            matrices = sum(p.numel() for p in buf.members if is_matrix(p)) if muon else 0
            if matrices:  # distributed_muon.py: the shard's updates to their owners and back
                sent += 2 * (group.size - 1) / group.size**2 * matrices * grad_size
                what += "; Muon's updates to and from their owners"
        else:
            sent = 2 * _ring(group.size) * padded * grad_size
            what = f"{name}: gradients all-reduced"
        out.append(Traffic(group.name, what, group, sent))
    return out


def _muon_gathers(params: list, state: ParallelState, distributed: bool) -> list[Traffic]:
    """Muon's all-gathers of TP- and expert-TP-cut matrices' float32 updates (``muon.py``),
    made by every rank, or with the distributed optimizer by each matrix's owner only (on
    average one data-parallel rank in DP)."""
    sent: dict[str, float] = {}
    groups: dict[str, Group] = {}
    for p in params:
        if not is_matrix(p):
            continue
        spec = spec_of(p)
        for split in spec.splits:
            group = state.group(split.group)
            if group.size > 1 and split.dim >= len(spec.shape) - 2:  # a matrix dimension (not EP's experts)
                gathered = (group.size - 1) * p.numel() * FP32 / orthogonalising_ranks(p, state, distributed)
                sent[group.name] = sent.get(group.name, 0.0) + gathered
                groups[group.name] = group
    return [Traffic(name, "Muon: TP-cut matrices' updates gathered whole", groups[name], sent[name]) for name in sent]
