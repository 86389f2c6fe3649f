"""Why the first wrong gradient of the lecture's table is wrong: what the numbers can tell.

The diagnoses every checker shares (a constant factor, a flipped sign, a transpose, zeroed rows)
are in checking.diagnoses; here are the lecture's own: its sizes n and n-1, the tensors its forward
pass uses twice (a missing branch, a branch off by a factor), the rows of C looked up more than
once (`=` instead of `+=`), memory shared with another gradient (a missing .clone() before +=),
and the wording of shape problems (a broadcast in the forward pass is a sum in the backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja.checking import diagnoses as common
from backprop_ninja.checking.verdict import close, gradient_scale, rounding_bound, squeezed
from backprop_ninja.grading.results import GradedRow
from backprop_ninja.lecture import network
from backprop_ninja.lecture.fixture import LectureSetup


def diagnose(name: str, grads: dict[str, Any], storages: dict[str, int], s: LectureSetup) -> list[str]:
    """Lines that say why d{name} is wrong; grads and s are in one dtype (float64 where it ran).
    storages: row name -> an id shared by the gradients that share memory."""
    mine, ref = grads[name], s.reference[name]
    if not isinstance(mine, Tensor):
        return [f"d{name} is a {mine.type_name}, not a tensor"]
    if not mine.dtype.is_floating_point:
        return [f"d{name} is {mine.dtype} where {name} is {ref.dtype}: a gradient is a floating-point tensor"]
    if mine.dtype != ref.dtype:
        return [f"d{name} is {mine.dtype} where {name} is {ref.dtype}: made with a fixed dtype? "
                f"(torch.zeros_like(t.{name}) follows its tensor)"]
    if mine.numel() == 0:
        return [f"d{name} is empty {tuple(mine.shape)}: {name} has shape {tuple(ref.shape)}, and an empty "
                "tensor compares True against anything with allclose"]
    transposed = common.transpose_note(name, mine, ref)
    if mine.shape != ref.shape and transposed:
        return [transposed]
    notes = []
    values = None
    if mine.shape == ref.shape or (mine.numel() == ref.numel() and squeezed(mine.shape) == squeezed(ref.shape)):
        values = mine.reshape(ref.shape)
    else:
        notes.append(shape_note(name, mine.shape, ref.shape))
        try:
            values = torch.broadcast_to(mine, ref.shape)
        except RuntimeError:
            pass
    if values is not None:
        note = _shared_memory_note(name, mine, grads, storages, s.reference) or _value_note(name, values, ref, s)
        if note:
            notes.append(note)
    return notes


def _value_note(name: str, values: Tensor, ref: Tensor, s: LectureSetup) -> str | None:
    if not torch.isfinite(values).all():
        return f"d{name} holds nan or inf: a division by zero, or the log of 0?"
    n = s.Xb.shape[0]
    return (common.zero_note(name, values, ref)
            or common.transpose_note(name, values, ref)
            or common.factor_note(name, values, ref, lecture_factors(n))
            or _branch_note(name, values, s)
            or _embedding_note(name, values, s)
            or common.partial_note(name, values, ref))


def lecture_factors(n: int) -> list[common.Factor]:
    """The lecture's usual slips with the batch size n, and a factor 2."""
    why = {
        n: f"n = {n} times too large: a missing 1/n (the loss is the mean over the n examples)",
        (n - 1) / n: "(n-1)/n of the right value: a 1/n where the forward pass divides by n-1 "
                     "(Bessel's correction: bnvar = 1/(n-1) * bndiff2.sum(0, keepdim=True))",
        n / (n - 1): "n/(n-1) of the right value: a 1/(n-1) where the forward pass divides by n "
                     "(bnmeani = 1/n * hprebn.sum(0, keepdim=True))",
    }
    return [common.Factor(k, why.get(k, text)) for k, text in common.size_factors(n)] + common.TWO


class Branch(NamedTuple):
    via: str  # the forward line through which the tensor reaches the loss
    gradient: Callable[[LectureSetup], Tensor]  # that branch's share of the gradient, from the reference


def _one_hot_max(s: LectureSetup) -> Tensor:
    return F.one_hot(s.t.logits.max(1).indices, s.t.logits.shape[1]).to(s.t.logits.dtype)  # (n, V)


# The tensors the forward pass uses twice: their gradient is the sum of one term per use.
BRANCHES: dict[str, tuple[Branch, Branch]] = {
    "counts": (
        Branch("probs = counts * counts_sum_inv", lambda s: s.t.counts_sum_inv * s.reference["probs"]),
        Branch("counts_sum = counts.sum(1, keepdim=True)",
               lambda s: torch.ones_like(s.t.counts) * s.reference["counts_sum"]),
    ),
    "logits": (
        Branch("norm_logits = logits - logit_maxes", lambda s: s.reference["norm_logits"]),
        Branch("logit_maxes = logits.max(1, keepdim=True).values",
               lambda s: _one_hot_max(s) * s.reference["logit_maxes"]),
    ),
    "bndiff": (
        Branch("bnraw = bndiff * bnvar_inv", lambda s: s.t.bnvar_inv * s.reference["bnraw"]),
        Branch("bndiff2 = bndiff**2", lambda s: 2 * s.t.bndiff * s.reference["bndiff2"]),
    ),
    "hprebn": (
        Branch("bndiff = hprebn - bnmeani", lambda s: s.reference["bndiff"]),
        Branch("bnmeani = 1/n * hprebn.sum(0, keepdim=True)",
               lambda s: torch.ones_like(s.t.hprebn) * s.reference["bnmeani"] / s.Xb.shape[0]),
    ),
}  # fmt: skip


def _branch_note(name: str, values: Tensor, s: LectureSetup) -> str | None:
    """values = a * (first branch) + b * (second branch): a branch missing, or off by a factor."""
    if name not in BRANCHES:
        return None
    first, second = BRANCHES[name]
    fit = common.two_term_fit(values, first.gradient(s), second.gradient(s))
    if fit is None:
        return None
    tolerance = common.FIT_SLACK * rounding_bound(values.dtype, 1.0)
    a, b = fit
    for (kept, k_kept), (other, k_other) in (((first, a), (second, b)), ((second, b), (first, a))):
        if not math.isclose(k_kept, 1, rel_tol=tolerance):
            continue
        if abs(k_other) <= tolerance:
            return (f"d{name} holds only the gradient through `{kept.via}`; {name} is used twice in the forward "
                    f"pass: add the gradient through `{other.via}`")
        if not math.isclose(k_other, 1, rel_tol=tolerance):
            factor = common.factor_note("", k_other * other.gradient(s), other.gradient(s),
                                        lecture_factors(s.Xb.shape[0]))
            what = factor.removeprefix("d is ") if factor else f"{k_other:.6g} times its right value"
            return f"d{name}: the term through `{other.via}` is {what}; the term through `{kept.via}` is right"
    return None


def _embedding_note(name: str, values: Tensor, s: LectureSetup) -> str | None:
    """emb = C[Xb]: a row of C looked up k times gets the sum of k gradients, not the last one."""
    if name != "C":
        return None
    ref = s.reference["C"]
    bound = rounding_bound(ref.dtype, gradient_scale(ref))
    repeated = torch.bincount(s.Xb.reshape(-1), minlength=ref.shape[0]) > 1  # (V,)
    wrong_rows = ((values - ref).abs() > bound).any(1)  # (V,)
    if wrong_rows.any() and not (wrong_rows & ~repeated).any():
        return (
            "only the rows of C looked up more than once in Xb are wrong: each lookup adds its gradient "
            "to the row; accumulate (+= in the loop, or index_add_), do not assign"
        )
    return None


def _shared_memory_note(name: str, mine: Tensor, grads: dict[str, Any], storages: dict[str, int],
                        reference: dict[str, Tensor]) -> str | None:
    """mine shares memory with another gradient AND holds its numbers, though the two should differ.

    Views such as demb = dembcat.view(...) share memory legitimately: their references agree too.
    """
    if name not in storages:
        return None
    for other, theirs in grads.items():
        if other == name or storages.get(other) != storages[name]:
            continue
        if not isinstance(theirs, Tensor) or theirs.numel() != mine.numel():
            continue
        if not close(mine.reshape(-1), theirs.reshape(-1).to(mine.dtype)):
            continue
        ref_a, ref_b = reference[name], reference[other]
        if ref_a.numel() == ref_b.numel() and close(ref_a.reshape(-1), ref_b.reshape(-1)):
            continue
        earlier, later = sorted((name, other), key=network.BACKWARD_ORDER.index)
        return (
            f"d{name} shares its memory with d{other} and holds d{other}'s numbers: an in-place += on one "
            f"changed the other. A missing .clone() before +=: d{later} = d{earlier}.clone()"
        )
    return None


# ---------------------------------------------------------------------------------------------
# notes beside the table


def verdict_note(r: GradedRow, s: LectureSetup) -> str | None:
    """One line where the verdict and the lecture's `approximate` disagree, saying why."""
    if r.row is None or r.status == "missing":
        return None
    scale = network.gradient_scale(r.name, s.reference)
    if r.status in ("right", "warning") and not r.row.approximate:
        head = f"{r.name} is right: approximate says False, but maxdiff {r.row.maxdiff:.2g} is float32 rounding"
        if r.name in network.ZERO_GRADIENTS:
            source, why = network.ZERO_GRADIENTS[r.name]
            return (f"{head}. Its exact gradient is 0 ({why}): yours and autograd's are noise beside d{source}'s "
                    f"{scale:.2g}")
        return f"{head}, {r.row.maxdiff / scale:.1g} of its largest entry; allclose's absolute 1e-8 is strict near 0"
    if r.status == "wrong" and r.row.approximate:
        return (f"{r.name} is wrong though approximate says True: it {r.reason}. allclose's absolute 1e-8 is "
                f"loose beside a gradient of {scale:.2g}")
    return None


# the wording of shape problems

BROADCAST_RULE = "a broadcast in the forward pass is a sum in the backward pass"


def shape_note(name: str, shape: torch.Size, expected: torch.Size) -> str:
    mine, want = _fmt(shape), _fmt(expected)
    head = f"d{name} has shape {mine} but {name} has shape {want}"
    summed = _broadcast_dims(expected, shape)
    if summed is not None:  # the learner's gradient is bigger: the sum over the broadcast dims is missing
        lead, kept = summed
        if kept and not lead:
            how = f".sum({kept[0]}, keepdim=True)" if len(kept) == 1 else f".sum({kept}, keepdim=True)"
        elif lead and not kept:
            how = f".sum({lead[0]})" if len(lead) == 1 else f".sum({lead})"
        else:
            how = f"a sum over dims {tuple(lead + kept)}"
        dims = lead + kept
        over = f"dim {dims[0]}" if len(dims) == 1 else f"dims {tuple(dims)}"
        return f"{head}: {name} was broadcast over {over} in the forward pass, and {BROADCAST_RULE}: {how}"
    if _broadcast_dims(shape, expected) is not None:  # smaller: fewer entries than the tensor has
        return (f"{head}: it would broadcast to {want}, but a gradient has one entry per entry of its tensor: "
                f"expand it, e.g. * torch.ones_like(t.{name})")
    return f"{head}: a gradient has its tensor's shape; {BROADCAST_RULE}"


def shape_warning(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """For a right gradient whose shape differs from its tensor's in size-1 dimensions only."""
    head = f"d{name} has shape {_fmt(shape)} but {name} has shape {_fmt(expected)}; it is right once broadcast"
    if len(shape) < len(expected):
        return f"{head}: keepdim=True in the sum that made it keeps the shape (e.g. .sum(0, keepdim=True))"
    if len(shape) > len(expected):
        return f"{head}: sum without keepdim=True (or .view({_fmt(expected)[1:-1]}))"
    return f"{head}: .view{_fmt(expected)} gives it its tensor's shape"


def _broadcast_dims(small: torch.Size, big: torch.Size) -> tuple[list[int], list[int]] | None:
    """If `small` broadcasts up to `big`: (leading dims it lacks, dims where it has size 1)."""
    if len(small) > len(big) or math.prod(small) >= math.prod(big):
        return None
    lead = len(big) - len(small)
    kept = []
    for i, (a, b) in enumerate(zip(small, big[lead:])):
        if a == 1 and b != 1:
            kept.append(lead + i)
        elif a != b:
            return None
    return list(range(lead)), kept


def _fmt(shape) -> str:
    return str(tuple(shape))
