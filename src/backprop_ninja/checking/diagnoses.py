"""What the numbers of a wrong gradient tell: the diagnoses every checker shares.

Each function looks at a wrong gradient `values` beside its reference `ref` (same shape, same
dtype) and returns one line, or None when the pattern is not there. The fits are held to the
verdict's rounding bound (checking.verdict), so a diagnosis is as sharp as the dtype allows:
in float64, n/(n-1) is told apart from 1 at any batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from backprop_ninja.checking.verdict import close, gradient_scale, rounding_bound, squeezed

# A fitted factor k, and the coefficients of a two-term fit, are good to the rounding of the
# tensors they are fitted on; a named factor matches when k is within this many times that bound.
FIT_SLACK = 4.0


class Factor(tuple):
    """(value, why): a named constant factor, e.g. (n, "n = 32 times too large: a missing 1/n")."""

    def __new__(cls, value: float, why: str):
        return super().__new__(cls, (float(value), why))


def fit_factor(values: Tensor, ref: Tensor) -> float | None:
    """The k with values = k * ref to rounding, or None when values are not a multiple of ref."""
    v, r = values.double(), ref.double()
    denominator = float((r * r).sum())
    if denominator == 0:
        return None
    k = float((v * r).sum()) / denominator
    bound = FIT_SLACK * rounding_bound(values.dtype, gradient_scale(ref) * max(1.0, abs(k)))
    return k if float((v - k * r).abs().max()) <= bound else None


def factor_note(name: str, values: Tensor, ref: Tensor, named: Iterable[Factor]) -> str | None:
    """Name the constant factor between a gradient and its reference: a sign flip, a named factor
    (every one that matches, when two coincide at this size), or the number itself."""
    k = fit_factor(values, ref)
    if k is None:
        return None
    tolerance = FIT_SLACK * rounding_bound(values.dtype, 1.0)
    flipped = k < 0
    if math.isclose(abs(k), 1, rel_tol=tolerance):
        return f"d{name} has its sign flipped: yours is minus the right gradient" if flipped else None
    matches = [why for value, why in named if math.isclose(abs(k), value, rel_tol=tolerance)]
    sign = "; and its sign is flipped" if flipped else ""
    if len(matches) == 1:
        return f"d{name} is {matches[0]}{sign}"
    if matches:  # e.g. 2 and n-1 at n = 3: say both, and how to tell them apart
        return (f"d{name} is {abs(k):.6g} times the right gradient{sign}, which at this size is each of: "
                + "; or ".join(matches) + ". Check at another size to tell them apart")
    return f"d{name} is {k:.6g} times the right gradient: a constant factor is off"


def size_factors(n: int, what: str = "n") -> list[Factor]:
    """The factors that a slip with a size n leaves: n, 1/n, n-1, 1/(n-1), n/(n-1), (n-1)/n."""
    factors = [
        Factor(n, f"{what} = {n} times too large: a missing 1/{what}"),
        Factor(1 / n, f"{what} = {n} times too small: a 1/{what} too many"),
    ]
    if n > 1:
        factors += [
            Factor((n - 1) / n, f"({what}-1)/{what} of the right value: a 1/{what} where the forward pass divides "
                                f"by {what}-1 (Bessel's correction)"),
            Factor(n / (n - 1), f"{what}/({what}-1) of the right value: a 1/({what}-1) where the forward pass "
                                f"divides by {what}"),
        ]
    if n > 2:
        factors += [
            Factor(n - 1, f"{what}-1 = {n - 1} times too large: a missing 1/({what}-1)"),
            Factor(1 / (n - 1), f"{what}-1 = {n - 1} times too small: a 1/({what}-1) too many"),
        ]
    return factors


TWO = [
    Factor(2, "twice the right value: a factor 2 too many, or one branch counted twice"),
    Factor(0.5, "half the right value: a missing factor 2 (the local derivative of x**2 is 2*x)"),
]


def two_term_fit(values: Tensor, first: Tensor, second: Tensor) -> tuple[float, float] | None:
    """(a, b) with values = a * first + b * second to rounding, or None."""
    basis = torch.stack([first.double().reshape(-1), second.double().reshape(-1)], 1)  # (K, 2)
    target = values.double().reshape(-1, 1)  # (K, 1)
    solution = torch.linalg.lstsq(basis, target).solution  # (2, 1)
    a, b = float(solution[0]), float(solution[1])
    fitted = (basis @ solution).reshape(values.shape)
    scale = gradient_scale(first) + gradient_scale(second)
    if float((fitted - values.double()).abs().max()) > FIT_SLACK * rounding_bound(values.dtype, scale):
        return None
    return a, b


def transpose_note(name: str, values: Tensor, ref: Tensor) -> str | None:
    if values.dim() == 2 and values.T.shape == ref.shape and close(values.T.contiguous(), ref):
        return (f"d{name} is the transpose of the right gradient (yours {tuple(values.shape)}, {name} "
                f"{tuple(ref.shape)}): for out = x @ W, dx = dout @ W.T and dW = x.T @ dout")
    return None


def zero_note(name: str, values: Tensor, ref: Tensor) -> str | None:
    if not values.any() and ref.any():
        return f"d{name} is all zeros: not filled in yet, or its branch was forgotten"
    return None


def partial_note(name: str, values: Tensor, ref: Tensor) -> str | None:
    """Right in some rows or columns and zero (or wrong) in the others."""
    if values.dim() < 2:
        return None
    scale = gradient_scale(ref)
    bound = rounding_bound(ref.dtype, scale)
    for dim, label in ((0, "rows"), (values.dim() - 1, "columns")):
        other = tuple(d for d in range(values.dim()) if d != dim)
        wrong = ((values - ref).abs() > bound).any(dim=other) if other else (values - ref).abs() > bound
        if 0 < int(wrong.sum()) < wrong.numel():
            zeroed = bool((values.movedim(dim, 0)[wrong] == 0).all())
            which = wrong.nonzero().reshape(-1).tolist()
            shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
            state = "zero" if zeroed else "wrong"
            return f"d{name} is right but for {len(which)} of its {wrong.numel()} {label} ({shown}), which are {state}"
    return None


# ---------------------------------------------------------------------------------------------
# for check_backward: an op the checker knows nothing of but its tensors' shapes


def dimension_factors(sizes: dict[int, list[str]]) -> list[Factor]:
    """size_factors, sqrt(d) and 1/sqrt(d) for every size in a check's shapes, each said with where
    it is: sizes maps a size to the places it occurs, e.g. {32: ["dim 0 of x"], 8: ["dim 1 of q"]}."""
    factors = []
    for n, places in sorted(sizes.items()):
        if n < 2:
            continue
        where = f" (n = {n}: {', '.join(places)})"
        factors += [Factor(value, why + where) for value, why in size_factors(n)]
        root = math.sqrt(n)
        factors += [
            Factor(root, f"sqrt(d) = {root:.4g} times too large, d = {n} ({', '.join(places)}): a missing 1/sqrt(d)"),
            Factor(1 / root, f"sqrt(d) = {root:.4g} times too small, d = {n} ({', '.join(places)}): a 1/sqrt(d) "
                             "too many"),
        ]
    return factors + TWO


def missing_term_note(name: str, values: Tensor, ref: Tensor, term: Tensor, term_name: str) -> str | None:
    """The right gradient less c * term: a branch of the forward pass left out of the backward."""
    if term.shape != ref.shape or not term.any():
        return None
    k = fit_factor(ref - values, term)
    if k is None or k == 0:
        return None
    times = "" if math.isclose(k, 1, rel_tol=1e-6) else f"{k:.6g} * "
    return (f"d{name} lacks the term {times}{term_name}: a branch where {name} reaches the output directly "
            "(a skip or residual connection, a second use of it) is missing from the backward pass")


def reduced_elsewhere_note(name: str, values: Tensor, ref: Tensor, upstream: Tensor, out: str = "out") -> str | None:
    """A broadcast parameter's gradient summed over the wrong dimensions of the upstream gradient:
    values = dout.sum(every dim but one) where ref keeps another dim (a bias at a square shape)."""
    if upstream.dim() < 2:
        return None

    def kept_by(t: Tensor) -> int | None:  # the dim that t is the upstream gradient summed onto
        for dim in range(upstream.dim()):
            summed = upstream.sum(tuple(d for d in range(upstream.dim()) if d != dim)).to(t.dtype)  # (size,)
            if summed.numel() == t.numel() and close(t.reshape(summed.shape), summed):
                return dim
        return None

    right, kept = kept_by(ref), kept_by(values)
    if right is None or kept is None or right == kept:
        return None
    others = tuple(d for d in range(upstream.dim()) if d != right)
    return (f"d{name} is d{out} summed onto its dim {kept}, where {name} is broadcast along every dim of {out} "
            f"but {right}: a sum over the wrong dimension (d{out}.sum({others[0] if len(others) == 1 else others}) "
            "is right)")


def wrong_shape_note(name: str, shape: tuple[int, ...], right: tuple[int, ...],
                     known: dict[str, tuple[int, ...]]) -> str | None:
    """A gradient with the size of another dimension of a tensor of the check than its own: the sum
    (or mean) that makes it kept the wrong dimension."""
    mine, want = squeezed(shape), squeezed(right)
    if len(mine) != 1 or len(want) != 1 or mine == want:
        return None
    for other, full in known.items():
        if mine[0] in full and want[0] in full:
            return (f"d{name} has shape {tuple(shape)}, the size of dim {full.index(mine[0])} of {other} "
                    f"{tuple(full)}, where {name} {tuple(right)} runs along its dim {full.index(want[0])}: "
                    "a sum over the wrong dimension")
    return None


def repeated_rows_note(name: str, wrong_rows: list[int], indices: dict[str, Tensor]) -> str | None:
    """Rows of a lookup table wrong exactly where an index occurs more than once: `=` where `+=`
    (index_add_, np.add.at) is needed."""
    for index_name, idx in indices.items():
        values, counts = idx.reshape(-1).unique(return_counts=True)
        repeated = set(values[counts > 1].tolist())
        if repeated and set(wrong_rows) <= repeated:
            return (f"d{name} is wrong in the rows that {index_name} looks up more than once ({len(wrong_rows)} of "
                    f"the {len(repeated)} repeated): repeated indices must add up, dW.index_add_(0, idx, dout) or "
                    "np.add.at, not dW[idx] = dout")
    return None


def centred_term_note(name: str, values: Tensor, ref: Tensor, x: Tensor, x_name: str) -> str | None:
    """The error is, along one dimension of x, a multiple of x - x.mean(dim): the term through a mean
    or variance over that dimension is off, e.g. a 1/n where the forward divides by n-1."""
    if x.shape != ref.shape or x.dim() < 2:
        return None
    error = (values.double() - ref.double())  # same shape as x
    bound = FIT_SLACK * rounding_bound(values.dtype, gradient_scale(ref))
    for dim in (0, x.dim() - 1):
        centred = x.double() - x.double().mean(dim, keepdim=True)
        a = (error * centred).sum(dim, keepdim=True) / (centred * centred).sum(dim, keepdim=True)
        if float((error - a * centred).abs().max()) <= bound:
            n = x.shape[dim]
            relative = float(error.abs().max()) / max(gradient_scale(ref), 1e-300)
            return (f"d{name} is off by a multiple of {x_name} - {x_name}.mean({dim}) along dim {dim} ({relative:.2g} of "
                    f"its size): the term through a mean or variance over dim {dim} is off; with n = {n}, a 1/n "
                    "where the forward pass divides by n-1 (Bessel's correction), or the reverse, leaves this")
    return None
