"""The lecture's comparison table: one row per tensor, hand-written gradient against a reference.

    logprobs        | exact: True  | approximate: True  | maxdiff: 0.0

`exact` is bit-for-bit equality; `approximate` is torch.allclose with its default tolerances, as
the lecture's cmp(); `maxdiff` is the largest absolute difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

# torch.allclose's defaults, which the lecture's cmp() uses: |a - b| <= atol + rtol * |b|.
# A correct float32 backward lands at maxdiff 1e-10..1e-8 on this network; a wrong one at 1e-3 or more.
APPROX_RTOL = 1e-5
APPROX_ATOL = 1e-8
# allclose's absolute 1e-8 fails correct float32 gradients on entries near 0 at small batches, where
# each entry is a sum of larger terms. A row is also right when maxdiff is within ROUNDING_RTOL of
# the scale of its gradient: correct backward passes land at <= 5e-6 of it (measured over seeds,
# batch 3..256, hidden 4..200); the smallest usual slip, n/(n-1) at n = 1000, is 1e-3.
ROUNDING_RTOL = 1e-4


class Row(NamedTuple):
    name: str
    exact: bool
    approximate: bool
    maxdiff: float  # nan when the two cannot be compared (shapes that do not broadcast)

    def __str__(self) -> str:
        return format_row(self)


def compare(name: str, mine: Tensor, reference: Tensor) -> Row:
    """Compare as the lecture's cmp(): shapes that broadcast to each other are compared elementwise."""
    try:
        diff = (mine.to(reference.dtype) - reference).abs()
    except RuntimeError:  # shapes that do not broadcast
        return Row(name, False, False, math.nan)
    exact = bool((diff == 0).all())
    approximate = torch.allclose(mine.to(reference.dtype), reference, rtol=APPROX_RTOL, atol=APPROX_ATOL)
    maxdiff = diff.max().item() if diff.numel() else 0.0
    return Row(name, exact, bool(approximate), maxdiff)


def within_rounding(row: Row, scale: float) -> bool:
    """Right: approximate, or off by no more than float32 rounding of a gradient of size `scale`."""
    return row.approximate or row.maxdiff <= ROUNDING_RTOL * scale  # a nan maxdiff compares False


def format_row(row: Row) -> str:
    return (
        f"{row.name:15s} | exact: {str(row.exact):5s} | approximate: {str(row.approximate):5s} "
        f"| maxdiff: {row.maxdiff}"
    )


def compare_all(mine: dict[str, Tensor], reference: dict[str, Tensor], names: Iterable[str]) -> list[Row]:
    return [compare(name, mine[name], reference[name]) for name in names]
