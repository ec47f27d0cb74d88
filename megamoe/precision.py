"""The precision policy: one object, built from the flags, that says what precision each part
of training runs in. Modules are handed its decisions; none of them reads a precision flag.

Today's decisions:

- the parameters' (and so the activations' and the half-precision gradients') dtype:
  bfloat16 with ``--bf16``, float16 with ``--fp16``, else float32;
- float32 master weights and float32 gradient accumulation whenever that dtype is 16-bit
  (the optimizers, ``megamoe/training/optimizer.py``);
- the loss scaling (``megamoe/training/loss_scale.py``): dynamic with ``--fp16``, fixed with
  ``--loss-scale``;
- the router's logits, scores and losses in ``--moe-router-dtype`` (float32 unless set), never
  in the activations' dtype; the output head's logits are reduced in float32
  (``megamoe/parallel/cross_entropy.py``);
- the peak throughput MFU is measured against: the dense 16-bit peak, for 16-bit runs only
  (FP8 runs too: their MFU is against the bf16 peak, as torchtitan quotes it);
- FP8 (``--fp8-format``, ``--fp8-recipe``): which transformer blocks run their linear layers
  and experts in FP8 and with which recipe (:meth:`fp8_layers`). ``--first-last-layers-bf16``
  keeps the first ``--num-layers-at-start-in-bf16`` and last ``--num-layers-at-end-in-bf16``
  decoder layers in bf16 (MTP blocks follow the last decoder layer); ``--fp8-min-linear-size``
  keeps the dense linears too small for FP8 to pay in bf16 (``Fp8Recipe.linear_pays``). The embedding, the output
  head and the routers never run in FP8 (the model does not hand them a recipe), as in Megatron
  and DeepSeek-V3.

The native recipes (``megamoe/kernels/fp8.py``, rowwise and tensorwise) and TE's tensorwise and
blockwise are current scaling: the scales come from the values being quantized, so there is no
scaling state to checkpoint; the FP8 copies of the weights are rebuilt from the (checkpointed)
bf16 weights after a load. TE's ``delayed`` keeps amax histories in its modules; they are not
checkpointed and refill over the first ``--fp8-amax-history-len`` steps after a load, as at the
start of a run (``megamoe/extensions/te.py``). ``--transformer-impl`` picks where the dense FP8
GEMMs run (the recipe's ``transformer_engine``); the experts' backend is their own flag.
``--fp8-param-gather`` (native recipes, distributed optimizer) makes the FP8 weights themselves
FP8 values, quantized from the masters after each step and all-gathered in FP8
(``megamoe/training/fp8_param_gather.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.config import Config, ModelConfig, TrainingConfig
from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.training.loss_scale import LossScaler, build_loss_scaler

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str  # "bf16", "fp16" or "fp32"
    training: TrainingConfig  # the loss-scaling flags
    fp8: Optional[Fp8Recipe] = None
    bf16_layers_at_start: int = 0  # decoder layers kept out of FP8
    bf16_layers_at_end: int = 0

    @classmethod
    def from_config(cls, config: Config) -> "PrecisionPolicy":
        t, m = config.training, config.model
        name = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
        return cls(name=name, training=t, fp8=_fp8_recipe(m), **_bf16_ends(m))

    @property
    def params_dtype(self) -> torch.dtype:
        """The model parameters' dtype (the activations follow it)."""
        return _DTYPES[self.name]

    @property
    def half(self) -> bool:
        """16-bit parameters, trained through float32 masters and main gradients."""
        return self.name != "fp32"

    def loss_scaler(self) -> Optional[LossScaler]:
        """A new scaler for this run, or None when the loss is not scaled."""
        return build_loss_scaler(self.training)

    def fp8_layers(self, num_layers: int, num_blocks: int) -> tuple[Optional[Fp8Recipe], ...]:
        """Each block's FP8 recipe (None: the activations' dtype): ``num_layers`` decoder layers,
        then the MTP blocks up to ``num_blocks``, which follow the last decoder layer."""
        first_fp8, end_fp8 = self.bf16_layers_at_start, num_layers - self.bf16_layers_at_end
        decoder = tuple(self.fp8 if first_fp8 <= i < end_fp8 else None for i in range(num_layers))
        return decoder + decoder[-1:] * (num_blocks - num_layers)

    def counts_toward_mfu(self) -> bool:
        """MFU is quoted against the dense 16-bit tensor-core peak, so only for 16-bit runs."""
        return self.half


def _fp8_recipe(m: ModelConfig) -> Optional[Fp8Recipe]:
    if not m.fp8_format:
        return None
    return Fp8Recipe(m.fp8_format, m.fp8_recipe, transformer_engine=m.transformer_impl == "transformer_engine",
                     amax_history_len=m.fp8_amax_history_len, amax_compute_algo=m.fp8_amax_compute_algo,
                     tp_only_amax_reduction=m.tp_only_amax_red, min_linear_size=m.fp8_min_linear_size)


def _bf16_ends(m: ModelConfig) -> dict:
    if not (m.fp8_format and m.first_last_layers_bf16):
        return {}
    return dict(bf16_layers_at_start=m.num_layers_at_start_in_bf16, bf16_layers_at_end=m.num_layers_at_end_in_bf16)
