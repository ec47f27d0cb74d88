"""A stand-in for the ``wandb`` package that records the calls megamoe makes on it, for tests
on machines without it (and without the network a real W&B run would use)."""

from __future__ import annotations

import importlib.machinery
import sys
import types


class FakeWandb(types.ModuleType):
    """``wandb.init`` / ``log`` / ``finish`` / ``Histogram`` / ``Image``, recorded."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec finds it
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, values, step):
        self.logged += [(tag, value, step) for tag, value in values.items()]

    def finish(self):
        self.finished += 1

    def Histogram(self, values):  # noqa: N802 - wandb's name
        return ("histogram", len(values))

    def Image(self, image):  # noqa: N802 - wandb's name
        return ("image", image.shape)


def install() -> FakeWandb:
    """Put a fresh stand-in where ``import wandb`` finds it (in this process)."""
    fake = FakeWandb()
    sys.modules["wandb"] = fake
    return fake
