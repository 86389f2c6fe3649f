"""`check --numerical`: every hand-written gradient against float64 central finite differences.

Autograd is a reference, but it is also code; finite differences only need the forward pass. For
each of the 26 tensors of the lecture's table, a float64 copy of the network is nudged one element
at a time by +-eps and the loss recomputed from that tensor downward:

    dloss/dx[i] ~ (loss(x + eps e_i) - loss(x - eps e_i)) / (2 eps)

Elementwise, not projected on a random direction: a projection checks one number per tensor and a
gradient wrong in a few entries (a wrong mask, one swapped row) can hide in it, while elementwise
differences test every entry with torch.autograd.gradcheck's own tolerances. The network is small
enough (about 24,000 entries at the lecture's shapes) for that to take seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja import lecture

# torch.autograd.gradcheck's defaults for float64: eps 1e-6, |numerical - analytical| <= atol + rtol*|numerical|.
# Correct gradients land at 1e-9..1e-11 here; a wrong one is off by its own magnitude (1e-3 and up).
FD_EPS = 1e-6
FD_ATOL = 1e-5
FD_RTOL = 1e-3
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
    ok = torch.allclose(analytical, numerical, rtol=FD_RTOL, atol=FD_ATOL)
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


@torch.no_grad()
def numerical_rows(params: dict[str, Tensor], Xb: Tensor, Yb: Tensor) -> list[NumericalRow]:
    """Compare lecture.backward on a float64 copy of the network with finite differences."""
    p64 = {k: v.detach().double().clone() for k, v in params.items()}
    t64 = lecture.forward(p64, Xb, Yb)
    mine = lecture.backward(p64, Xb, Yb, t64)
    rows = []
    for name in lecture.BACKWARD_ORDER:
        if name in p64:  # a parameter: nudge it where the forward pass reads it

            def loss_of(x: Tensor, name: str = name) -> Tensor:
                return lecture.forward({**p64, name: x}, Xb, Yb).loss

            numerical = central_differences(loss_of, p64[name])
        else:  # an intermediate: hold it at a nudged value and recompute what lies downstream

            def loss_of(x: Tensor, name: str = name) -> Tensor:
                return lecture.forward(p64, Xb, Yb, given={name: x}).loss

            numerical = central_differences(loss_of, getattr(t64, name))
        rows.append(numerical_row(name, mine[name], numerical, numerical.numel()))
    return rows


def run_numerical(args: argparse.Namespace) -> bool:
    """Print one row per tensor and the summary line; True when every tensor is within tolerance."""
    from backprop_ninja.check import LECTURE_HIDDEN, lecture_setup

    setup = lecture_setup(args.seed, args.batch_size, args.hidden or LECTURE_HIDDEN, args.input)
    print(f"Numerical check: float64 central differences (eps {FD_EPS:g}, atol {FD_ATOL:g}, rtol {FD_RTOL:g})")
    return print_rows(numerical_rows(setup.params, setup.Xb, setup.Yb))


def print_rows(rows: list[NumericalRow]) -> bool:
    """One line per tensor, then `numerical check: N/M tensors within tolerance`; True if all are."""
    for row in rows:
        print(row)
    passed = sum(row.ok for row in rows)
    print(f"numerical check: {passed}/{len(rows)} tensors within tolerance")
    return passed == len(rows)
