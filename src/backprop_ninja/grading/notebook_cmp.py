"""The lecture's cmp(s, dt, t) for a learner's own notebook, judged by the package's one verdict.

    from backprop_ninja import cmp       # in place of the lecture's def cmp(s, dt, t)
    cmp('logprobs', dlogprobs, logprobs)
    backprop_ninja.report()              # the first divergence so far

It prints the lecture's row unchanged, and one more line when the gradient is wrong: the verdict's
reason and, where the numbers tell, why (the diagnoses every checker shares). The rows of this
process are kept, one per label (the latest call), for report().
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from backprop_ninja.checking import diagnoses as common
from backprop_ninja.checking.verdict import (
    SCALE_FLOOR, Judgement, Row, compare, format_row, gradient_scale, judge, squeezed,
)
from backprop_ninja.grading import diagnoses
from backprop_ninja.lecture.network import ZERO_GRADIENTS


@dataclass
class Compared:
    label: str
    row: Row | None
    judgement: Judgement | None  # None: not attempted, or nothing to compare with
    diagnosis: str | None = None
    status: str = "right"  # right, wrong, not attempted, unchecked


@dataclass
class Report:
    """What report() returns; its repr is the text a notebook shows."""

    rows: list[Compared] = field(default_factory=list)

    @property
    def first_divergence(self) -> str | None:
        return next((r.label for r in self.rows if r.status == "wrong"), None)

    def __repr__(self) -> str:
        done = [r for r in self.rows if r.status in ("right", "wrong")]
        if not self.rows:
            return "backprop-ninja: no gradient compared yet (from backprop_ninja import cmp)"
        first = next((r for r in self.rows if r.status == "wrong"), None)
        todo = [r.label for r in self.rows if r.status == "not attempted"]
        later = f"; not attempted yet: {', '.join(todo)}" if todo else ""
        if first is None:
            return f"backprop-ninja: all {len(done)} gradients compared so far are right{later}"
        wrong = sum(r.status == "wrong" for r in self.rows)
        text = (f"backprop-ninja: first divergence so far: d{first.label} {first.judgement.reason} "
                f"({wrong} of {len(done)} compared rows wrong{later})")
        return text + (f"\n  {first.diagnosis}" if first.diagnosis else "")

    __str__ = __repr__


_session = Report()
_largest: list[float] = []  # the largest gradient compared so far: the scale floor of the next rows
_scales: dict[str, float] = {}


def cmp(s, dt, t) -> None:
    """The lecture's cmp: `exact`, `approximate` and `maxdiff` of dt against t.grad, as it prints
    them; then, when dt is wrong by the verdict, one line saying why."""
    label = str(s)
    ref = t.grad if isinstance(t, Tensor) else None
    if dt is None:
        print(f"{label:15s} | not attempted: the gradient is still None")
        return _keep(Compared(label, None, None, status="not attempted"))
    if ref is None:
        why = (f"{label}.grad is None: call {label}.retain_grad() before loss.backward()" if isinstance(t, Tensor)
               else f"the third argument is a {type(t).__name__}, not the tensor whose gradient dt is")
        print(f"{label:15s} | cannot compare: {why}")
        return _keep(Compared(label, None, None, status="unchecked"))
    row = compare(label, dt, ref) if isinstance(dt, Tensor) else None
    if row is not None:
        print(format_row(row))
    scale = gradient_scale(ref, SCALE_FLOOR * max(_largest, default=0.0))
    if label in ZERO_GRADIENTS and ZERO_GRADIENTS[label][0] in _scales:
        scale = max(scale, _scales[ZERO_GRADIENTS[label][0]])
    _scales[label] = gradient_scale(ref)
    _largest.append(gradient_scale(ref))
    verdict = judge(dt, ref, scale)
    if verdict.right:
        return _keep(Compared(label, row, verdict))
    notes = generic_diagnosis(label, dt, ref, _batch_size(ref)) if isinstance(dt, Tensor) else []
    why = notes[0] if notes else None
    print(f"{'':15s}   wrong: d{label} {verdict.reason}" + (f"; {why}" if why else ""))
    return _keep(Compared(label, row, verdict, why, "wrong"))


def report() -> Report:
    """The rows compared by backprop_ninja.cmp in this kernel so far; its repr names the first divergence."""
    return Report(list(_session.rows))


def _keep(compared: Compared) -> None:
    rows = _session.rows
    for k, r in enumerate(rows):
        if r.label == compared.label:
            rows[k] = compared
            return None
    rows.append(compared)
    return None


_first_batch: list[int] = []


def _batch_size(ref: Tensor) -> int | None:
    """The lecture's n: the rows of the first 2-d gradient compared (dlogprobs is (n, V))."""
    if not _first_batch and ref.dim() == 2:
        _first_batch.append(ref.shape[0])
    return _first_batch[0] if _first_batch else None


def generic_diagnosis(name: str, mine: Tensor, ref: Tensor, n: int | None) -> list[str]:
    """The diagnoses that need nothing but the two tensors (and the batch size n, when known)."""
    if mine.dtype != ref.dtype:
        return [f"d{name} is {mine.dtype} where {name} is {ref.dtype}"]
    if mine.numel() == 0:
        return [f"d{name} is empty {tuple(mine.shape)}: {name} has shape {tuple(ref.shape)}"]
    notes = []
    values = None
    if mine.numel() == ref.numel() and squeezed(mine.shape) == squeezed(ref.shape):
        values = mine.reshape(ref.shape)
    else:
        notes.append(common.transpose_note(name, mine, ref) or diagnoses.shape_note(name, mine.shape, ref.shape))
    if values is not None:
        factors = diagnoses.lecture_factors(n) if isinstance(n, int) and n > 2 else common.TWO
        note = (common.zero_note(name, values, ref) or common.factor_note(name, values, ref, factors)
                or common.partial_note(name, values, ref))
        if note:
            notes.append(note)
    return notes
