"""Training plots written into the run directory (matplotlib, Agg backend: no display needed).

    write_loss_plot(losses, DIR / "loss.png")   # the lecture's
                                                # plt.plot(torch.tensor(lossi).view(-1, 1000).mean(1))
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor

from backprop_ninja.checkpoint import atomic_write

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


def write_loss_plot(losses: Tensor, path: str | os.PathLike) -> None:
    """Write the training curve as a PNG, atomically (temp file in the same directory, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    x, y = loss_curve(losses)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x.numpy(), y.numpy())
    group = LOSS_GROUP if losses.shape[0] >= LOSS_GROUP else 1
    ax.set_xlabel("step")
    ax.set_ylabel(f"log10 loss (mean of {group} steps)" if group > 1 else "log10 loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write(path, buffer.getvalue())
