"""The expert-load heat map written to tensorboard: MoE layer x expert, in units of the layer's
mean load, with an EP-rank view that marks the straggler rank.

Readable from 8 to a few hundred experts and tens of layers: the figure grows with the grid
(within bounds), tick labels thin out to at most ~16 per axis, and cells carry their value when
the grid is small. Colours diverge at 1 (balanced, white): red over-loaded, blue under-loaded.
The scale is clipped at 0 and at max(2, largest ratio), so one hot expert stays visible.

matplotlib renders it headless (Agg). Without matplotlib the reporter skips the image and says
so once.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

_MAX_TICKS = 16
_ANNOTATE_CELLS = 256  # write each cell's value when the grid has at most this many cells


def _tick_step(count: int) -> int:
    """1, 2, 4, 8... so that at most ``_MAX_TICKS`` labels fit on an axis of ``count`` cells."""
    return 1 << max(0, math.ceil(math.log2(max(count / _MAX_TICKS, 1))))


def _load_ratio(load: np.ndarray) -> np.ndarray:
    return load / np.maximum(load.mean(axis=-1, keepdims=True), 1e-9)


def per_ep_rank_load(load: np.ndarray, ep_size: int) -> np.ndarray:
    """[layers, ep]: tokens each EP rank's experts received (experts are laid out by rank)."""
    return load.reshape(load.shape[0], ep_size, -1).sum(-1)


def straggler(load: np.ndarray, ep_size: int) -> tuple[int, float]:
    """The EP rank whose experts receive the most tokens over all layers, and its load over the
    mean rank's (1.0 is balanced)."""
    per_rank = per_ep_rank_load(load, ep_size).sum(0)
    rank = int(per_rank.argmax())
    return rank, float(per_rank[rank] / max(per_rank.mean(), 1e-9))


def expert_load_figure(load: np.ndarray, ep_size: int = 1, layer_names: Optional[Sequence[str]] = None,
                       iteration: Optional[int] = None):
    """A matplotlib figure of ``load`` ([MoE layers, experts] token counts); with ``ep_size``
    > 1 a second panel shows the load of each EP rank (experts are laid out by rank) with each
    layer's most loaded rank marked, and the overall straggler named in the title."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    layers, experts = load.shape
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(layers)]
    ratio = _load_ratio(load)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(ratio.max())))
    width = min(16.0, max(6.0, 3.0 + 0.05 * experts + (2.0 if ep_size > 1 else 0.0)))
    height = min(14.0, max(3.5, 1.5 + 0.2 * layers))
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    if ep_size > 1:
        ax, ax_ep = fig.subplots(1, 2, width_ratios=[max(experts, 4), max(ep_size + 2, 0.15 * experts)])
    else:
        ax, ax_ep = fig.subplots(1, 1), None
    image = ax.imshow(ratio, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    _label_axes(ax, experts, names, "expert")
    if layers * experts <= _ANNOTATE_CELLS:
        _annotate(ax, ratio)
    title = "Expert load, in units of each layer's mean"
    if iteration is not None:
        title += f" (iteration {iteration})"
    if ax_ep is not None:
        per_expert_rank = experts // ep_size
        for boundary in range(1, ep_size):  # where one EP rank's experts end
            ax.axvline(boundary * per_expert_rank - 0.5, color="black", linewidth=0.8)
        rank_ratio = _load_ratio(per_ep_rank_load(load, ep_size))
        ax_ep.imshow(rank_ratio, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        _label_axes(ax_ep, ep_size, names, "EP rank")
        ax_ep.scatter(rank_ratio.argmax(axis=1), np.arange(layers), marker="x", color="black", s=18,
                      label="most loaded rank")
        rank, over = straggler(load, ep_size)
        ax_ep.set_title(f"per EP rank; straggler: rank {rank} ({over:.2f}x)", fontsize=9)
        ax.set_title("per expert (lines: EP rank boundaries)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    bar = fig.colorbar(image, ax=[a for a in (ax, ax_ep) if a is not None], shrink=0.9)
    bar.set_label("load / layer mean (1 = balanced)", fontsize=8)
    return fig


def _label_axes(ax, columns: int, layer_names: list[str], column_label: str) -> None:
    rows = len(layer_names)
    x_ticks = list(range(0, columns, _tick_step(columns)))
    y_ticks = list(range(0, rows, _tick_step(rows)))
    ax.set_xticks(x_ticks, [str(i) for i in x_ticks], fontsize=7)
    ax.set_yticks(y_ticks, [layer_names[i] for i in y_ticks], fontsize=7)
    ax.set_xlabel(column_label)
    ax.set_ylabel("MoE layer")


def _annotate(ax, ratio: np.ndarray) -> None:
    for (row, col), value in np.ndenumerate(ratio):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="white" if abs(value - 1.0) > 0.6 else "black")


def figure_to_rgb(fig) -> np.ndarray:
    """The figure rendered to an RGB array [height, width, 3] (uint8)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def expert_load_heatmap(load: np.ndarray, ep_size: int = 1, layer_names: Optional[Sequence[str]] = None,
                        iteration: Optional[int] = None) -> np.ndarray:
    """:func:`expert_load_figure` as an RGB image for ``SummaryWriter.add_image(..., dataformats="HWC")``."""
    return figure_to_rgb(expert_load_figure(load, ep_size, layer_names, iteration))
