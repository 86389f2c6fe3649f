"""Float64 central finite differences: a reference that needs nothing but the forward pass.

Autograd is a reference, but it is also code. Here a float64 copy of the network is nudged one
element at a time by +-eps and the loss recomputed from that tensor downward:

    dloss/dx[i] ~ (loss(x + eps e_i) - loss(x - eps e_i)) / (2 eps)

Elementwise, not projected on a random direction: a projection checks one number per tensor and a
gradient wrong in a few entries (a wrong mask, one swapped row) can hide in it, while elementwise
differences test every entry with torch.autograd.gradcheck's own tolerances (verdict.FD_*).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.checking.verdict import FD_EPS, within_finite_difference

CHUNK = 2048  # nudged copies evaluated together (one chunk for most tensors); bounds the memory


class NumericalRow(NamedTuple):
    name: str
    ok: bool
    maxdiff: float  # largest |hand-written - finite difference| over the entries nudged
    entries: int  # how many entries were nudged
    numel: int  # of how many

    def __str__(self) -> str:
        of = "" if self.entries == self.numel else f" of {self.numel}"
        return (f"{self.name:15s} | numerical: {str(self.ok):5s} | maxdiff: {self.maxdiff:.3e} "
                f"| entries: {self.entries}{of}")


def numerical_row(name: str, analytical: Tensor, numerical: Tensor, numel: int) -> NumericalRow:
    """Hand-written against finite differences, with gradcheck's tolerances."""
    ok = within_finite_difference(analytical, numerical)
    maxdiff = (analytical - numerical).abs().max().item()
    return NumericalRow(name, bool(ok), maxdiff, numerical.numel(), numel)


def central_difference_at(loss_now: Callable[[], float], flat: Tensor, i: int, eps: float = FD_EPS) -> float:
    """d loss / d flat[i]: nudge that one entry in place by +-eps, then put it back.

    One entry per call, for forward passes that vmap cannot batch: the layer models' BatchNorm
    updates its running statistics in place (`check --model --numerical`).
    """
    original = flat[i].item()
    flat[i] = original + eps
    plus = loss_now()
    flat[i] = original - eps
    minus = loss_now()
    flat[i] = original
    return (plus - minus) / (2 * eps)


def central_differences(loss_of: Callable[[Tensor], Tensor], x: Tensor, eps: float = FD_EPS) -> Tensor:
    """d loss_of(x) / d x by central differences, one entry at a time.

    The nudged copies of x are evaluated CHUNK at a time with torch.func.vmap (a batching transform,
    not autograd), which turns tens of thousands of small forward passes into a few hundred.
    """
    k = x.numel()
    grad = torch.empty(k, dtype=x.dtype)  # (k,)
    batched_loss = torch.func.vmap(loss_of)
    for start in range(0, k, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, k))  # (c,)
        nudges = torch.zeros(len(rows), k, dtype=x.dtype)  # (c, k): eps at entry i of row i
        nudges[torch.arange(len(rows)), rows] = eps
        nudges = nudges.view(len(rows), *x.shape)  # (c, *x.shape)
        plus, minus = batched_loss(x + nudges), batched_loss(x - nudges)  # (c,), (c,)
        grad[rows] = (plus - minus) / (2 * eps)
    return grad.view(x.shape)


def summary_line(rows: list[NumericalRow]) -> str:
    """`numerical check: N/M tensors within tolerance`."""
    return f"numerical check: {sum(row.ok for row in rows)}/{len(rows)} tensors within tolerance"
