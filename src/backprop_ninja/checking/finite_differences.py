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

# Nudged copies evaluated together, for a forward pass over a batch of 32; a larger batch makes each
# copy larger, so the chunk shrinks in proportion (chunk_for): the memory stays that of batch 32.
CHUNK = 2048
CHUNK_BATCH = 32
# A tensor is checked entry by entry while entries x batch is at most ALL_ENTRIES_WORK (each entry
# costs two forward passes over the batch: every tensor of the lecture's batch of 32). A larger one
# is checked on SAMPLED_ENTRIES entries drawn by a seeded generator, plus one directional derivative
# along a random unit vector v:
# (L(x + eps v) - L(x - eps v)) / 2 eps against <grad, v>. The samples see a bug in a fraction f of
# the entries with probability 1 - (1 - f)**SAMPLED_ENTRIES (f = 5%: 96%); the projection sees any
# error whose norm is more than about FD_RTOL of the gradient's, wherever it is (docs/checking.md).
ALL_ENTRIES_WORK = 2048 * 32
SAMPLED_ENTRIES = 64


def chunk_for(batch_size: int) -> int:
    return max(1, CHUNK * CHUNK_BATCH // max(batch_size, CHUNK_BATCH))


class NumericalRow(NamedTuple):
    name: str
    ok: bool
    maxdiff: float  # largest |hand-written - finite difference| over the entries nudged
    entries: int  # how many entries were nudged
    numel: int  # of how many
    projected: bool = False  # also checked along a random direction (a sampled tensor)

    def __str__(self) -> str:
        of = "" if self.entries == self.numel else f" of {self.numel}"
        along = " + 1 direction" if self.projected else ""
        return (f"{self.name:15s} | numerical: {str(self.ok):5s} | maxdiff: {self.maxdiff:.3e} "
                f"| entries: {self.entries}{of}{along}")


def numerical_row(name: str, analytical: Tensor, numerical: Tensor, numel: int,
                  projection: tuple[float, float] | None = None) -> NumericalRow:
    """Hand-written against finite differences, with gradcheck's tolerances; `projection` is
    (<hand-written, v>, its finite difference) along a random direction v, where one was taken."""
    ok = within_finite_difference(analytical, numerical)
    maxdiff = (analytical - numerical).abs().max().item()
    if projection is not None:
        mine, fd = (torch.tensor([value], dtype=torch.float64) for value in projection)
        ok = ok and within_finite_difference(mine, fd)
        maxdiff = max(maxdiff, abs(projection[0] - projection[1]))
    return NumericalRow(name, bool(ok), maxdiff, numerical.numel(), numel, projection is not None)


def sampled_entries(numel: int, batch_size: int, g: torch.Generator) -> Tensor | None:
    """The flat indices to nudge: None (all of them) for a small tensor, else SAMPLED_ENTRIES drawn by g."""
    if numel * batch_size <= ALL_ENTRIES_WORK or numel <= SAMPLED_ENTRIES:
        return None
    return torch.randperm(numel, generator=g)[:SAMPLED_ENTRIES].sort().values


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


def central_differences(loss_of: Callable[[Tensor], Tensor], x: Tensor, eps: float = FD_EPS,
                        entries: Tensor | None = None, chunk: int = CHUNK) -> Tensor:
    """d loss_of(x) / d x by central differences, one entry at a time: every entry (x's shape), or
    the flat `entries` given ((k,)).

    The nudged copies of x are evaluated `chunk` at a time with torch.func.vmap (a batching
    transform, not autograd), which turns tens of thousands of small forward passes into a few hundred.
    """
    numel = x.numel()
    picks = torch.arange(numel) if entries is None else entries  # (k,)
    grad = torch.empty(len(picks), dtype=x.dtype)  # (k,)
    batched_loss = torch.func.vmap(loss_of)
    for start in range(0, len(picks), chunk):
        rows = picks[start:start + chunk]  # (c,)
        nudges = torch.zeros(len(rows), numel, dtype=x.dtype)  # (c, numel): eps at entry rows[i] of row i
        nudges[torch.arange(len(rows)), rows] = eps
        nudges = nudges.view(len(rows), *x.shape)  # (c, *x.shape)
        plus, minus = batched_loss(x + nudges), batched_loss(x - nudges)  # (c,), (c,)
        grad[start:start + len(rows)] = (plus - minus) / (2 * eps)
    return grad.view(x.shape) if entries is None else grad


def directional_difference(loss_of: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, eps: float = FD_EPS) -> float:
    """(loss_of(x + eps v) - loss_of(x - eps v)) / (2 eps): the derivative along v."""
    return float((loss_of(x + eps * v) - loss_of(x - eps * v)) / (2 * eps))


def summary_line(rows: list[NumericalRow]) -> str:
    """`numerical check: N/M tensors within tolerance`."""
    return f"numerical check: {sum(row.ok for row in rows)}/{len(rows)} tensors within tolerance"
