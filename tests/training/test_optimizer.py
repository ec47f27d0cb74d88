"""The optimizer against torch's own parts: gradient clipping folded into a fused AdamW step
gives the update of ``torch.nn.utils.clip_grad_norm_`` followed by an unfused AdamW."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from megamoe.config import TrainingConfig
from megamoe.parallel.state import ParallelState
from megamoe.training.optimizer import MixedPrecisionAdamW


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
    return model(x).square().sum() * 50  # gradients far above the clip


def test_clip_folded_into_the_fused_step_matches_clipping_the_gradients(monkeypatch):
    real_adamw = torch.optim.AdamW
    # the CUDA path (fused=True) on CPU, where torch also has a fused AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, fused=None, **k: real_adamw(*a, fused=True, **k))
    t = TrainingConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5)
    model = _model()
    ref = copy.deepcopy(model)
    opt = MixedPrecisionAdamW(model, t, ParallelState.single())
    assert opt.optimizer.defaults["fused"]
    ref_opt = real_adamw([{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": t.weight_decay},
                          {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                         lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
    for step, max_norm in enumerate((t.clip_grad, t.clip_grad, 1e9)):  # the last step needs no clip
        opt.zero_grad()
        _loss(model, step).backward()
        opt.finish_grad_sync()
        norm = opt.clip_grad_norm(max_norm)
        unclipped = torch.linalg.vector_norm(torch.stack([p.main_grad.norm() for p in opt.params])).item()
        opt.step(t.lr)

        ref_opt.zero_grad()
        _loss(ref, step).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
        ref_opt.step()

        assert norm > 10 * t.clip_grad
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm
        assert abs(unclipped - norm) <= 1e-5 * norm  # the step applied the clip, the gradients kept theirs
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
