"""The MLP with tensor parallelism (SwiGLU or GeLU): the dense layers' FFN and the shared experts."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.kernels.fp8 import Fp8Recipe
from megamoe.parallel import mappings
from megamoe.parallel.state import Group
from megamoe.parallel.tensor_parallel import ColumnParallelLinear, InitFn, RowParallelLinear, normal_init


class MLP(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` (``gated``, SwiGLU) or ``w2(gelu(w1 x))``: w1 and w3
    column-parallel, w2 row-parallel (DeepSeek names)."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        tp: Group,
        sequence_parallel: bool = False,
        init_fn: InitFn = normal_init(0.02),
        output_init_fn: InitFn = normal_init(0.02),
        gated: bool = True,
        fp8: Optional[Fp8Recipe] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.tp, self.sequence_parallel = tp, sequence_parallel and tp.size > 1
        kw = dict(tp=tp, sequence_parallel=sequence_parallel, fp8=fp8, device=device, dtype=dtype)
        self.w1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, input_comm=False, init_fn=init_fn, **kw)
        self.w3 = None
        if gated:
            self.w3 = ColumnParallelLinear(hidden_size, ffn_hidden_size, input_comm=False, init_fn=init_fn, **kw)
        self.w2 = RowParallelLinear(ffn_hidden_size, hidden_size, init_fn=output_init_fn, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = mappings.enter_tensor_region(x, self.tp, self.sequence_parallel)  # one gather for w1 and w3
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
