"""Training plots written into the run directory (matplotlib's Agg canvas: no display, no pyplot state).

    write_loss_plot(losses, DIR / "loss.png")   # the lecture's
                                                # plt.plot(torch.tensor(lossi).view(-1, 1000).mean(1))
    save_figure(path, draw)                     # any plot: draw(fig) on a fresh figure, written atomically

The diagnostics' activations.png, gradients.png and update-ratio.png are drawn with save_figure too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from backprop_ninja.files import atomic_write

LOSS_GROUP = 1000  # steps averaged into one point, as the lecture's .view(-1, 1000).mean(1)


def loss_curve(losses: Tensor, group: int = LOSS_GROUP) -> tuple[Tensor, Tensor]:
    """(steps,) losses -> (x, y): the mean log10 loss of each group of `group` steps.

    x is the first step of each group. A run shorter than one group is plotted step by step; a
    last, partial group is averaged over the steps it has.
    """
    log_losses = losses.double().log10()  # (steps,)
    steps = log_losses.shape[0]
    if steps < group:
        group = 1
    starts = torch.arange(0, steps, group)  # (G,)
    full = (steps // group) * group
    means = log_losses[:full].view(-1, group).mean(1)  # (steps // group,)
    if full < steps:
        means = torch.cat([means, log_losses[full:].mean().view(1)])  # (G,)
    return starts, means


def write_loss_plot(losses: Tensor, path: str | os.PathLike) -> Path:
    """Write the training curve as a PNG."""
    x, y = loss_curve(losses)
    group = LOSS_GROUP if losses.shape[0] >= LOSS_GROUP else 1

    def draw(fig) -> None:
        ax = fig.add_subplot()
        ax.plot(x.numpy(), y.numpy())
        ax.set_xlabel("step")
        ax.set_ylabel(f"log10 loss (mean of {group} steps)" if group > 1 else "log10 loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)

    return save_figure(path, draw, figsize=(8, 4.5))


def save_figure(path: str | os.PathLike, draw: Callable, figsize: tuple[float, float] = (12, 4)) -> Path:
    """Call draw(fig) on a fresh figure and write it as a PNG, whole or not at all."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: only --plots needs it
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path
