"""Top-k router: scores, (group-limited) expert choice, probabilities, balancing losses,
aux-loss-free expert bias and capacity dropping. All router math is float32, or float64 with
``router_dtype`` (``--moe-router-dtype fp64``); never the activations' bf16.

Shape legend: T tokens on this rank, E experts, K experts per token, G expert groups,
B sequences, S tokens of one sequence on this rank.

Scope of the balancing statistics (the same in every parallel layout):

- ``aux_loss``: the tokens of one micro-batch of one data-parallel rank (all its TP shards);
- ``seq_aux_loss``: each sequence of that micro-batch separately (DeepSeek-V3), then averaged;
- ``global_aux_loss``: the token counts of the micro-batches of all data-parallel ranks
  together (one micro-batch step), with this rank's probabilities;
- z-loss: mean over the micro-batch's tokens of ``logsumexp(logits) ** 2``;
- capacity: ``ceil(factor * tokens_in_micro_batch * K / E)`` per expert, decided over the whole
  micro-batch, keeping the highest-probability pairs (``probs``) or the earliest tokens
  (``position``); ties go to the earlier token (position-major, then sequence in the batch).

Tokens of one micro-batch may be spread over the ``tokens`` group (TP ranks, each holding a
slice of the sequence dimension; with context parallelism TP x CP ranks). Counts are
all-reduced over it; each rank returns its *share* of every loss, so the shares sum to the loss
and each rank backpropagates only through its own tokens' probabilities. Where order matters
(capacity), tokens are ordered by their place in the micro-batch (``order_T``), not by rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.parallel import mappings
from megamoe.parallel.param_spec import ParamSpec, set_spec
from megamoe.parallel.permutation import count_per_expert
from megamoe.parallel.state import Group
from megamoe.parallel.tensor_parallel import InitFn, init_sharded_, normal_init

LoadBalancing = Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"]


@dataclass
class Routing:
    """What the router decided for this rank's tokens."""

    probs_TK: torch.Tensor  # combine weights (float32, differentiable); 0 where dropped
    experts_TK: torch.Tensor  # chosen expert ids (int64)
    kept_TK: Optional[torch.Tensor]  # False where capacity dropped the pair; None when dropless
    capacity: Optional[int]  # per-expert capacity when dropping, else None
    aux_loss: torch.Tensor  # this rank's share of the balancing loss (coefficient applied)
    z_loss: torch.Tensor  # this rank's share of the z-loss (coefficient applied)
    tokens_per_expert_E: torch.Tensor  # assignments over the micro-batch, before dropping
    num_dropped: torch.Tensor  # pairs dropped over the micro-batch


class TopKRouter(nn.Module):
    """DeepSeek-style gate: ``weight`` [E, D] and, with aux-loss-free balancing, ``bias`` [E]."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        topk: int,
        score_function: Literal["softmax", "sigmoid"] = "softmax",
        pre_softmax: bool = False,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        topk_scaling_factor: Optional[float] = None,
        load_balancing: LoadBalancing = "aux_loss",
        aux_loss_coeff: float = 0.0,
        z_loss_coeff: Optional[float] = None,
        enable_expert_bias: bool = False,
        bias_update_rate: float = 1e-3,
        capacity_factor: Optional[float] = None,
        drop_policy: Literal["probs", "position"] = "probs",
        grad_partial_over_tp: bool = False,
        init_fn: InitFn = normal_init(0.02),
        router_dtype: torch.dtype = torch.float32,
        random_logits: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.router_dtype = router_dtype
        self.random_logits = random_logits
        self.num_experts, self.topk = num_experts, topk
        self.score_function, self.pre_softmax = score_function, pre_softmax
        self.num_groups, self.group_topk = num_groups, group_topk
        self.scaling = topk_scaling_factor
        self.load_balancing, self.aux_coeff, self.z_coeff = load_balancing, aux_loss_coeff, z_loss_coeff
        self.bias_update_rate = bias_update_rate
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.init_fn = init_fn
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        set_spec(self.weight, ParamSpec("router", (num_experts, hidden_size), grad_partial_over_tp=grad_partial_over_tp))
        if enable_expert_bias:
            self.register_buffer("bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.bias = None

    def init_weights(self, generator: torch.Generator) -> None:
        init_sharded_(self.weight, tuple(self.weight.shape), None, None, self.init_fn, generator)
        if self.bias is not None:
            self.bias.zero_()

    # ------------------------------------------------------------------ choice and probabilities

    def _select(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K]: top-k of the selection scores (+ bias), within the best groups."""
        if self.score_function == "softmax" and not self.pre_softmax:
            choice_TE = logits_TE
        else:
            choice_TE = scores_TE
        if self.bias is not None:
            choice_TE = choice_TE + self.bias  # the bias chooses experts; it never weights them
        if self.num_groups:
            T, E, G = choice_TE.shape[0], self.num_experts, self.num_groups
            grouped = choice_TE.view(T, G, E // G)
            if self.score_function == "sigmoid":  # DeepSeek-V3: a group scores its top-2 sum
                group_score_TG = grouped.topk(min(2, E // G), dim=-1).values.sum(-1)
            else:
                group_score_TG = grouped.amax(dim=-1)
            best_groups = group_score_TG.topk(self.group_topk, dim=-1).indices
            allowed = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
            choice_TE = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(T, E)
        return choice_TE.topk(self.topk, dim=-1).indices

    def _probs(self, scores_TE, logits_TE, experts_TK):
        if self.score_function == "sigmoid":
            probs = scores_TE.gather(1, experts_TK)
            if self.topk > 1:
                probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        elif self.pre_softmax:
            probs = scores_TE.gather(1, experts_TK)
        else:
            probs = torch.softmax(logits_TE.gather(1, experts_TK), dim=-1)
        return probs * self.scaling if self.scaling else probs

    # ------------------------------------------------------------------ losses

    def _balancing_loss(self, scores_TE, counts_E, counts_BE, num_seqs, tokens: Group, dp: Optional[Group]):
        """This rank's share of the balancing loss: E * sum_i f_i * P_i, f_i = counts_i / (T K)."""
        E, K = self.num_experts, self.topk
        zero = scores_TE.new_zeros(())
        if self.load_balancing == "none" or not self.aux_coeff:
            return zero
        # P uses the scores normalised over all experts (sigmoid scores sum to more than one).
        if self.score_function == "sigmoid":
            dist_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        else:
            dist_TE = scores_TE
        T_scope = scores_TE.shape[0] * tokens.size
        if self.load_balancing == "aux_loss":
            return self.aux_coeff * E * (counts_E * dist_TE.sum(0)).sum() / (K * T_scope * T_scope)
        if self.load_balancing == "seq_aux_loss":
            seq_len = T_scope // num_seqs
            probs_sum_BE = dist_TE.view(-1, num_seqs, E).sum(0)  # tokens are [S, B] sequence-major
            per_seq = (counts_BE * probs_sum_BE).sum(-1) * E / (K * seq_len * seq_len)
            return self.aux_coeff * per_seq.mean()
        # global_aux_loss: counts over every data-parallel rank; shares averaged over DP give the loss.
        global_counts_E = counts_E.clone()
        dp_size = 1
        if dp is not None and dp.size > 1:
            mappings.all_reduce_(global_counts_E, dp)
            dp_size = dp.size
        T_global = T_scope * dp_size
        return self.aux_coeff * E * (global_counts_E * dist_TE.sum(0)).sum() / (K * T_global * T_scope)

    def _z_loss(self, logits_TE: torch.Tensor, tokens: Group) -> torch.Tensor:
        if not self.z_coeff:
            return logits_TE.new_zeros(())
        T_scope = logits_TE.shape[0] * tokens.size
        return self.z_coeff * torch.logsumexp(logits_TE, dim=-1).square().sum() / T_scope

    # ------------------------------------------------------------------ capacity

    def capacity(self, num_tokens_scope: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens_scope * self.topk / self.num_experts)

    def _keep_mask(self, probs_TK, experts_TK, tokens: Group, order_T: Optional[torch.Tensor]):
        """Which (token, k) pairs fit their expert's capacity, decided over the micro-batch."""
        T = probs_TK.shape[0]
        all_probs = mappings.all_gather(probs_TK.detach(), tokens, dim=0)
        all_experts = mappings.all_gather(experts_TK, tokens, dim=0)
        capacity = self.capacity(all_probs.shape[0])
        flat_e, flat_p = all_experts.reshape(-1), all_probs.reshape(-1)
        n = flat_e.numel()
        # pairs in micro-batch order (token, then k): the tie-break, and the order for "position"
        order = torch.arange(n, device=flat_e.device)
        if order_T is not None:
            all_order_T = mappings.all_gather(order_T, tokens, dim=0)
            order = torch.sort((all_order_T[:, None] * self.topk + torch.arange(self.topk, device=flat_e.device))
                               .reshape(-1), stable=True).indices
        if self.drop_policy == "probs":
            order = order[torch.sort(flat_p[order], descending=True, stable=True).indices]
        order = order[torch.sort(flat_e[order], stable=True).indices]  # grouped by expert
        counts = count_per_expert(flat_e, self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(n, device=flat_e.device) - starts[flat_e[order]]
        keep = torch.empty(n, dtype=torch.bool, device=flat_e.device)
        keep[order] = rank_in_expert < capacity
        keep = keep.view(-1, self.topk)
        mine = keep[tokens.rank * T:(tokens.rank + 1) * T]
        return mine, capacity, (~keep).sum()

    # ------------------------------------------------------------------ forward

    def forward(self, x_TD: torch.Tensor, num_seqs: int, tokens: Group, dp: Optional[Group] = None,
                order_T: Optional[torch.Tensor] = None) -> Routing:
        """Route this rank's tokens ``x_TD`` (``[S, B]`` flattened sequence-major).

        ``tokens``: the group over which the micro-batch's tokens are spread; ``dp``: the
        data-parallel group for global_aux_loss; ``order_T``: each token's place in the
        micro-batch (``position * B + sequence``), when the ranks' slices are not simply
        consecutive (context parallelism); unset means group order then local order.
        """
        math_dtype = torch.promote_types(x_TD.dtype, self.router_dtype)
        logits_TE = F.linear(x_TD.to(math_dtype), self.weight.to(math_dtype))
        if self.random_logits:
            # --moe-router-force-load-balancing: route on noise, with the gradient passed straight
            # through to the real logits. The device's default stream is the same on the TP ranks
            # of a stage, so replicated tokens (TP without SP) still pick the same experts, and
            # recomputation replays it.
            logits_TE = logits_TE + (torch.randn_like(logits_TE) - logits_TE).detach()
        if self.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        with torch.no_grad():
            experts_TK = self._select(scores_TE.detach(), logits_TE.detach())
        probs_TK = self._probs(scores_TE, logits_TE, experts_TK)

        with torch.no_grad():
            routed_TE = torch.zeros_like(scores_TE).scatter_(1, experts_TK, 1.0)
            counts_E = mappings.all_reduce_(routed_TE.sum(0), tokens)
            counts_BE = None  # per-sequence counts: only the sequence-level loss needs them
            if self.load_balancing == "seq_aux_loss":
                counts_BE = mappings.all_reduce_(routed_TE.view(-1, num_seqs, self.num_experts).sum(0), tokens)

        aux = self._balancing_loss(scores_TE, counts_E, counts_BE, num_seqs, tokens, dp)
        z = self._z_loss(logits_TE, tokens)
        kept_TK, capacity = None, None
        num_dropped = counts_E.new_zeros(())
        if self.capacity_factor is not None:
            kept_TK, capacity, num_dropped = self._keep_mask(probs_TK, experts_TK, tokens, order_T)
            probs_TK = probs_TK * kept_TK
        return Routing(probs_TK, experts_TK, kept_TK, capacity, aux, z, counts_E, num_dropped.float())

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise under-loaded experts' bias, lower over-loaded ones.

        ``load_E`` is the observed assignment count over the whole global batch.
        """
        if self.bias is not None:
            self.bias.add_(self.bias_update_rate * torch.sign(load_E.mean() - load_E))

