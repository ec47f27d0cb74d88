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
- the peak throughput MFU is measured against: the dense 16-bit peak, for 16-bit runs only.

FP8 (``--fp8-format``, ``--fp8-recipe``, ``--transformer-impl transformer_engine``) is declared
and refused until its layers land; they will take their recipe per layer from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe.config import Config, TrainingConfig
from megamoe.training.loss_scale import LossScaler, build_loss_scaler

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str  # "bf16", "fp16" or "fp32"
    training: TrainingConfig  # the loss-scaling flags

    @classmethod
    def from_config(cls, config: Config) -> "PrecisionPolicy":
        t = config.training
        name = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
        return cls(name=name, training=t)

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

    def counts_toward_mfu(self) -> bool:
        """MFU is quoted against the dense 16-bit tensor-core peak, so only for 16-bit runs."""
        return self.half
