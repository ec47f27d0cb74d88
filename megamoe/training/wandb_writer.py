"""``--wandb-project``: what the reporter writes to tensorboard, also sent to Weights & Biases.

The reporter talks to one writer with tensorboard's ``SummaryWriter`` calls; :class:`Writers`
passes each call to every writer the run asked for, and :class:`WandbWriter` turns them into
``wandb.log`` calls at the same iteration (Megatron-LM logs the same keys to both).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from megamoe.config import Config


class WandbWriter:
    """A W&B run that takes ``SummaryWriter``'s calls."""

    def __init__(self, config: Config):
        import wandb  # checked by validation: --wandb-project needs the package

        log, save = config.logging, config.checkpoint.save
        directory = log.wandb_save_dir or (os.path.join(save, "wandb") if save else None)
        if directory:
            os.makedirs(directory, exist_ok=True)
        kwargs = {"project": log.wandb_project, "name": log.wandb_exp_name, "dir": directory,
                  "config": dataclasses.asdict(config)}
        if log.wandb_entity:
            kwargs["entity"] = log.wandb_entity
        self.wandb = wandb
        wandb.init(**kwargs)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.wandb.log({tag: value}, step=step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        self.wandb.log({tag: self.wandb.Histogram(np.asarray(values))}, step=step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        if dataformats != "HWC":
            raise ValueError(f"W&B images are written from HWC arrays, not {dataformats}")
        self.wandb.log({tag: self.wandb.Image(image)}, step=step)

    def flush(self) -> None:
        pass  # W&B sends in the background

    def close(self) -> None:
        self.wandb.finish()


class Writers:
    """Several writers behind one ``SummaryWriter`` interface."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        for w in self.writers:
            w.add_histogram(tag, values, step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        for w in self.writers:
            w.add_image(tag, image, step, dataformats=dataformats)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
