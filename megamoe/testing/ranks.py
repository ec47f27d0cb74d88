"""One rank of a training job built for a test, as training builds it: config, parallel state,
model, optimizer, mock data and RNG tracker (on a ``DistributedWorkers`` rank, or alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.cli import parse_config
from megamoe.config import Config
from megamoe.config_validation import validate
from megamoe.parallel.random import RNGStatesTracker, model_parallel_seed
from megamoe.parallel.state import ParallelState
from megamoe.training.optimizer import Optimizer
from megamoe.training.train import MicroBatches, build_model, build_optimizer, train_step

CPU = torch.device("cpu")


@dataclass
class TrainingRank:
    config: Config
    state: ParallelState
    model: torch.nn.Module
    optimizer: Optimizer
    data: MicroBatches
    rng: RNGStatesTracker

    @property
    def planning_state(self) -> ParallelState:
        """This rank's groups without process groups: what the planners take."""
        return ParallelState.without_process_groups(self.state.layout, self.state.rank)

    def step(self, iteration: int = 1) -> None:
        """One training step over this rank's micro-batches of ``iteration``."""
        batches = [self.data.get(iteration - 1, j) for j in range(self.data.num_micro)]
        train_step(self.model, self.optimizer, batches, iteration, self.config, self.state, self.rng)


def training_rank(flags: list[str], device: torch.device = CPU) -> TrainingRank:
    """This rank of the job ``flags`` describe (the world is the process group's, or one rank)."""
    torch.set_num_threads(1)
    config = parse_config(flags)
    state = ParallelState.build(**config.parallel.degrees())
    validate(config, state.layout.world_size)
    model = build_model(config, state, device)
    return TrainingRank(config, state, model, build_optimizer(model, config, state), MicroBatches(config, state, device),
                        model_parallel_seed(config.training.seed, state, device))
