"""Stochastic weight averaging: the running mean of the parameters over the end of a run."""

from __future__ import annotations

import torch
from torch import Tensor

SNAPSHOT_EVERY = 100  # steps between snapshots: the training loop's chunk length (loop.SYNC_EVERY)


class WeightAverage:
    """Stochastic weight averaging (Izmailov et al., 2018): the running mean of the parameters,
    taken after every SNAPSHOT_EVERY-th step from step `first` on. It does not change training: at the
    end the mean replaces the weights, and BatchNorm is calibrated for them (the lecture's
    calibration, which the averaged weights need: the statistics of the last weights are not theirs).

    wavenet's recipe averages over its lr = 0.01 phase (models.ModelSpec.average_from).
    """

    def __init__(self, first: int, mean: dict[str, Tensor] | None = None, count: int = 0) -> None:
        self.first = first
        self.mean = mean  # name -> running mean of that parameter; None before the first snapshot
        self.count = count  # snapshots in the mean

    def observe(self, step: int, params: dict[str, Tensor]) -> None:
        """Take a snapshot if `step` steps done is one of the averaged points."""
        if step < self.first or step % SNAPSHOT_EVERY:
            return
        self.count += 1
        if self.mean is None:
            self.mean = {name: p.clone() for name, p in params.items()}
        else:  # mean += (p - mean) / count
            torch._foreach_lerp_(list(self.mean.values()), list(params.values()), 1 / self.count)

    def apply(self, params: dict[str, Tensor]) -> None:
        """Replace the parameters by their average (in place: every holder of them sees it)."""
        for name, p in params.items():
            p.copy_(self.mean[name])
