"""The presets of ``examples/configs/`` as :class:`~megamoe.config.Config` objects, for tests
and tools that start from a known model (``preset("demo")`` is the quick start's model)."""

from __future__ import annotations

from pathlib import Path

from megamoe.cli import config_from_values, load_yaml_values
from megamoe.config import Config

PRESETS_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"


def preset(name: str) -> Config:
    """``examples/configs/{name}.yaml`` over the defaults, as ``--config`` would load it."""
    return config_from_values(load_yaml_values(str(PRESETS_DIR / f"{name}.yaml")))
