"""Mock data: sequences drawn from a fixed random Markov chain.

Every token has ``num_successors`` possible next tokens with Dirichlet-drawn probabilities, so
the chain's entropy rate is far below ``ln(vocab)`` and the loss visibly falls. Sample ``i`` is
a deterministic function of ``(seed, i)`` alone, so every parallel layout that reads the same
sample indices sees the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch


class MarkovMockData:
    """Sequences of ``seq_length + 1`` tokens; inputs are the first ``seq_length``, labels the last."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_successors: int = 4):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        chain = np.random.default_rng([seed, 0x6D6F636B])  # "mock": the chain itself
        self.successors = chain.integers(0, vocab_size, size=(vocab_size, num_successors))
        probs = chain.dirichlet(np.full(num_successors, 0.5), size=vocab_size)
        self.cumulative = np.cumsum(probs, axis=1)
        self.cumulative[:, -1] = 1.0
        self.entropy_rate = float(-(probs * np.log(probs + 1e-30)).sum(1).mean())  # nats, roughly

    def sequences(self, indices: list[int]) -> np.ndarray:
        """Token sequences ``[len(indices), seq_length + 1]`` for the given global sample indices."""
        n, steps = len(indices), self.seq_length + 1
        draws = np.stack([np.random.default_rng([self.seed, int(i)]).random(steps) for i in indices])
        out = np.empty((n, steps), dtype=np.int64)
        cur = (draws[:, 0] * self.vocab_size).astype(np.int64)
        out[:, 0] = cur
        for t in range(1, steps):
            choice = (draws[:, t, None] > self.cumulative[cur]).sum(1)
            cur = self.successors[cur, choice]
            out[:, t] = cur
        return out

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        seq = torch.from_numpy(self.sequences(indices))
        return {
            "tokens": seq[:, :-1].to(device),
            "labels": seq[:, 1:].to(device),
            "loss_mask": torch.ones(len(indices), self.seq_length, device=device),
        }
