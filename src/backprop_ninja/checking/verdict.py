"""The one verdict policy: when is a hand-written gradient right?

Every check of the package decides through this module: `check`, `check --model`, the grader, the
notebook grader, `check_backward` and `train --verify-every`.

Two things are shown and one is decided:

- the lecture's row, shown as the lecture's cmp() prints it:

      logprobs        | exact: True  | approximate: True  | maxdiff: 0.0

  `exact` is bit-for-bit equality, `approximate` torch.allclose with its defaults, `maxdiff` the
  largest absolute difference. allclose's absolute 1e-8 is no verdict: it fails correct float32
  gradients near 0 at small batches, and passes wrong ones whose entries shrink like 1/n at large
  batches (a Bessel slip at batch 5000).
- the verdict (`judge`): right means all of
  - a tensor of the reference's floating dtype (a float32 gradient where float64 was computed
    carries float32 rounding);
  - the same number of entries as the reference, in the reference's shape, or in a shape that
    differs from it only in dimensions of size 1 (right, with a warning);
  - finite values;
  - an error within the rounding of the computation: maxdiff <= ROUNDING_ULPS * eps(dtype) * scale.
  An empty tensor, a shape that would broadcast to another shape, NaN or a wrong dtype are wrong,
  each with a one-line reason.

`scale` is the size of the terms the gradient's rounding comes from: the largest entry of the
reference, and never less than SCALE_FLOOR of the largest gradient in the same check (a gradient
whose exact value is 0, e.g. a bias before BatchNorm, is rounding noise of the gradients around it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

# torch.allclose's defaults, which the lecture's cmp() uses: |a - b| <= atol + rtol * |b|. Shown, not decided.
APPROX_RTOL = 1e-5
APPROX_ATOL = 1e-8

# A correct backward differs from autograd by the rounding of another summation order: tens of
# units in the last place of the terms' scale (docs/verdict.md). 1024 ulp leaves a margin over
# that and bounds the error at 1.2e-4 of the scale in float32 and 2.3e-13 in float64: the smallest
# relative slip the verdict sees. A Bessel slip n/(n-1) is 1e-3 at n = 1000: float32 misses it from
# n of about 8,000, float64 at no batch a user will try (so the grader runs the learner's code in
# float64 too).
ROUNDING_ULPS = 1024
# A gradient whose exact value is 0 is noise of the gradients it is computed from; its scale is
# never taken below this fraction of the largest gradient in the same check.
SCALE_FLOOR = 1e-3


def rounding_bound(dtype: torch.dtype, scale: float) -> float:
    """The largest error that rounding in `dtype` explains for a gradient of size `scale`."""
    return ROUNDING_ULPS * torch.finfo(dtype).eps * scale


class Row(NamedTuple):
    """The lecture's comparison row."""

    name: str
    exact: bool
    approximate: bool
    maxdiff: float  # nan when the two cannot be compared (shapes that do not broadcast)

    def __str__(self) -> str:
        return format_row(self)


def compare(name: str, mine: Tensor, reference: Tensor) -> Row:
    """The row as the lecture's cmp() computes it: shapes that broadcast are compared elementwise.

    An empty broadcast (a (0, H) tensor against (1, H)) compares nothing: its row is nan, not True.
    """
    try:
        diff = (mine.to(reference.dtype) - reference).abs()
    except RuntimeError:  # shapes that do not broadcast
        return Row(name, False, False, math.nan)
    if diff.numel() == 0 and reference.numel() > 0:
        return Row(name, False, False, math.nan)
    exact = bool((diff == 0).all())
    approximate = torch.allclose(mine.to(reference.dtype), reference, rtol=APPROX_RTOL, atol=APPROX_ATOL)
    maxdiff = diff.max().item() if diff.numel() else 0.0
    return Row(name, exact, bool(approximate), maxdiff)


def format_row(row: Row) -> str:
    return (
        f"{row.name:15s} | exact: {str(row.exact):5s} | approximate: {str(row.approximate):5s} "
        f"| maxdiff: {row.maxdiff}"
    )


def compare_all(mine: dict[str, Tensor], reference: dict[str, Tensor], names: Iterable[str]) -> list[Row]:
    return [compare(name, mine[name], reference[name]) for name in names]


# ---------------------------------------------------------------------------------------------
# the verdict


class Judgement(NamedTuple):
    right: bool
    reason: str | None  # why it is wrong, one line; None when right
    maxdiff: float  # nan when the values cannot be compared
    bound: float  # the rounding bound it was held to
    reshaped: bool  # right values in a shape that differs in size-1 dimensions (a warning)


def squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def gradient_scale(reference: Tensor, floor: float = 0.0) -> float:
    """The size of the terms a gradient's rounding comes from: its largest entry, or `floor`."""
    largest = float(reference.abs().max()) if reference.numel() else 0.0
    return max(largest, floor)


def scale_floor(references: Iterable[Tensor]) -> float:
    """SCALE_FLOOR of the largest gradient of a check: the least scale of any of its rows."""
    return SCALE_FLOOR * max((gradient_scale(r) for r in references), default=0.0)


def judge(mine, reference: Tensor, scale: float | None = None) -> Judgement:
    """Right or wrong, with the reason: the package's one verdict (see the module docstring)."""
    nan = math.nan
    if scale is None:
        scale = gradient_scale(reference)
    bound = rounding_bound(reference.dtype, scale)
    if not isinstance(mine, Tensor):
        return Judgement(False, f"is a {type(mine).__name__}, not a tensor", nan, bound, False)
    if mine.dtype != reference.dtype:
        return Judgement(False, f"is {_dtype(mine.dtype)} where the tensor is {_dtype(reference.dtype)}",
                         nan, bound, False)
    if mine.device != reference.device:
        return Judgement(False, f"is on {mine.device}, the tensor on {reference.device}", nan, bound, False)
    if mine.numel() != reference.numel():
        what = "is empty" if mine.numel() == 0 else f"has {mine.numel()} entries"
        return Judgement(False, f"{what}; the tensor has {reference.numel()} (shape {tuple(reference.shape)})",
                         nan, bound, False)
    reshaped = mine.shape != reference.shape
    if reshaped and squeezed(mine.shape) != squeezed(reference.shape):
        return Judgement(False, f"has shape {tuple(mine.shape)} where the tensor has {tuple(reference.shape)}",
                         nan, bound, False)
    values = mine.detach().reshape(reference.shape)
    if not bool(torch.isfinite(values).all()):
        return Judgement(False, "holds nan or inf", nan, bound, reshaped)
    maxdiff = float((values - reference).abs().max()) if reference.numel() else 0.0
    if maxdiff > bound:
        return Judgement(False, f"is off by {maxdiff:.3g}, more than rounding explains ({bound:.2g})",
                         maxdiff, bound, reshaped)
    return Judgement(True, None, maxdiff, bound, reshaped)


def close(a: Tensor, b: Tensor, scale: float | None = None) -> bool:
    """Whether a equals b up to the rounding the verdict allows (same shape required): for diagnoses."""
    if not isinstance(a, Tensor) or a.shape != b.shape:
        return False
    return judge(a.to(b.dtype), b, scale).right


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# finite differences: torch.autograd.gradcheck's tolerances for float64

# eps 1e-6, |numerical - analytical| <= atol + rtol*|numerical|. Correct gradients land at 1e-9..1e-11
# here; a wrong one is off by its own magnitude (1e-3 and up).
FD_EPS = 1e-6
FD_ATOL = 1e-5
FD_RTOL = 1e-3


def within_finite_difference(analytical: Tensor, numerical: Tensor) -> bool:
    return bool(torch.allclose(analytical, numerical, rtol=FD_RTOL, atol=FD_ATOL))


# ---------------------------------------------------------------------------------------------
# a gradient of a lower precision against a float64 truth (check_backward)

# Central differences of each output (an output that does not depend on the nudged entry changes by
# exactly 0), projected on the upstream gradient, in float64 with step FD_EPS: measured 1e-11..1e-9 of
# the gradient's scale on the checker's corpus. A truth of finite differences is trusted to 1e-6 of
# the scale: 1000 times its error, and 1000 times below a Bessel slip n/(n-1) at n = 1000.
FD_TRUTH_RTOL = 1e-6


def judge_float64_truth(mine, truth: Tensor, dtype: torch.dtype, scale: float,
                        finite_differences: bool = False) -> Judgement:
    """judge() of a gradient that should be of `dtype` against a truth computed in float64: the truth
    rounded to `dtype`, held to dtype's rounding bound, or to the error of finite differences
    (FD_TRUTH_RTOL of the scale) where the truth is made of them and that is the larger."""
    judgement = judge(mine, truth.to(dtype), scale)
    truth_error = FD_TRUTH_RTOL * scale if finite_differences else 0.0
    if judgement.right or math.isnan(judgement.maxdiff) or truth_error <= judgement.bound:
        return judgement
    maxdiff = float((mine.detach().reshape(truth.shape).double() - truth).abs().max())
    if maxdiff > truth_error:
        return Judgement(False, f"is off by {maxdiff:.3g}, more than finite differences explain ({truth_error:.2g})",
                         maxdiff, truth_error, judgement.reshaped)
    return Judgement(True, None, maxdiff, truth_error, judgement.reshaped)
