"""Loss scaling for fp16 training, with Megatron-LM's flags and rules.

float16 gradients underflow below 6e-8 and overflow above 65504. The loss is multiplied by a
scale before backward, so small gradients stay representable, and the float32 main gradients
are divided by it before the step. With ``--fp16`` the scale is dynamic (unless
``--loss-scale`` fixes it): it starts at ``--initial-loss-scale`` (2**32); an overflow (a
non-finite gradient norm, the same on every rank) skips the step, and after ``--hysteresis``
overflows (2) the scale is halved, never below ``--min-loss-scale`` (1); after
``--loss-scale-window`` (1000) steps without one it doubles, which also refills the hysteresis.
These are Megatron-LM's ``DynamicGradScaler`` rules, so a launch script's flags give the same
scale sequence. Powers of two keep the scaling exact: a step that does not overflow computes the
same update as it would unscaled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megamoe.config import TrainingConfig


@dataclass
class LossScaler:
    """The scale, and the counters its rules keep. ``dynamic`` False: a fixed ``--loss-scale``."""

    scale: float
    dynamic: bool = True
    min_scale: float = 1.0
    window: int = 1000
    hysteresis: int = 2
    growth_tracker: int = 0  # steps since the last overflow or growth
    hysteresis_tracker: int = 2  # overflows still tolerated before the scale is halved
    skipped: int = 0  # steps skipped for an overflow, in the whole run

    def update(self, overflowed: bool) -> None:
        """After a step: record whether its gradients overflowed and adjust the scale."""
        if overflowed:
            self.skipped += 1
        if not self.dynamic:
            return
        if overflowed:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale / 2, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= 2

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """The counters and scale of a saved run; the rules (flags) stay this run's, and so does
        a fixed ``--loss-scale``."""
        for key in ("scale", "growth_tracker", "hysteresis_tracker", "skipped") if self.dynamic else ("skipped",):
            setattr(self, key, saved[key])


def build_loss_scaler(t: TrainingConfig) -> Optional[LossScaler]:
    """The scaler the flags ask for: dynamic with ``--fp16``, fixed with ``--loss-scale``
    (fp16 or bf16, as in Megatron-LM), none otherwise."""
    if t.loss_scale is not None:
        return LossScaler(scale=t.loss_scale, dynamic=False)
    if not t.fp16:
        return None
    return LossScaler(scale=t.initial_loss_scale, min_scale=t.min_loss_scale, window=t.loss_scale_window,
                      hysteresis=t.hysteresis, hysteresis_tracker=t.hysteresis)

