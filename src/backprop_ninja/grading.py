"""Grade a learner's own backward pass: `backprop-ninja check --solution FILE`, `backprop_ninja.grade()`.

A solution defines any of the lecture's three exercises:

    backward(t) -> {name: gradient}                   Exercise 1, the 26 rows of the table
    cross_entropy_backward(logits, Yb) -> dlogits     Exercise 2
    batchnorm_backward(t, dhpreact) -> dhprebn        Exercise 3

Each one runs on fresh copies of the lecture's batch (so a solution that writes into its inputs
cannot corrupt the reference) and is compared with autograd row by row, in the lecture's format.
Where a gradient is wrong, the report names the first divergence in backward order and says why
whenever the numbers tell: a wrong shape, memory shared with another gradient (a missing .clone()
before +=), a constant factor (n vs n-1, a missing 1/n), a flipped sign, a transpose, a missing
branch. Gradients that are wrong only because an earlier one is wrong are listed, not diagnosed.

Exit codes of the CLI: 0 every gradient given is right and none is missing; 1 something is wrong,
missing or raised; 2 the file cannot be graded (UserError).
"""

from __future__ import annotations

import argparse
import html
import itertools
import math
import os
import shlex
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import lecture
from backprop_ninja.check import LECTURE_HIDDEN, LectureSetup, lecture_setup
from backprop_ninja.compare import APPROX_ATOL, APPROX_RTOL, ROUNDING_RTOL, Row, compare, format_row, within_rounding
from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write
from backprop_ninja.models import LECTURE_SEED

# A gradient off by a constant factor k fits k * reference to float32 rounding (~1e-6 relative to
# the largest entry); any other bug leaves residuals of order one. 1e-4 separates the two.
FACTOR_FIT_RTOL = 1e-4
# How close the fitted k must be to a named factor (n, 1/n, n/(n-1), ...). n/(n-1) - 1 is 1e-3 even
# at n = 1000, and a least-squares k over a whole tensor is good to ~1e-6.
FACTOR_MATCH_RTOL = 1e-4


class Exercise(NamedTuple):
    function: str  # what the solution file defines
    title: str  # heading of its table
    names: tuple[str, ...]  # its rows, in backward order


EXERCISES = (
    Exercise("backward", "Exercise 1: backward(t), every intermediate one by one", lecture.BACKWARD_ORDER),
    Exercise("cross_entropy_backward", "Exercise 2: cross_entropy_backward(logits, Yb) -> dlogits", ("logits",)),
    Exercise("batchnorm_backward", "Exercise 3: batchnorm_backward(t, dhpreact) -> dhprebn", ("hprebn",)),
)
FUNCTION_NAMES = tuple(ex.function for ex in EXERCISES)
FROM_PYTHON = "your functions"  # the report's name for functions passed to grade() directly


# ---------------------------------------------------------------------------------------------
# loading a solution file

_module_ids = itertools.count()


def load_solution(path: str | os.PathLike) -> dict[str, Callable]:
    """Run the learner's file as a fresh module and return the exercise functions it defines.

    Compiled by hand rather than through an import loader, so no __pycache__ lands next to it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a Python file")
    try:
        source = path.read_bytes()
        code = compile(source, str(path), "exec")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except SyntaxError as err:
        where = f"{path}:{err.lineno}" if err.lineno else f"{path}"
        raise UserError(f"{where}: not valid Python ({err.msg})") from None

    name = f"_backprop_ninja_solution_{next(_module_ids)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # e.g. @dataclass in the solution looks its module up
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as err:  # an exit() at the end of a script must not end the grading
        raise UserError(f"{_location(err, {str(path)}) or path}: running the file raised {_one_line(err)}") from None
    finally:
        del sys.modules[name]

    functions = {}
    for fname in FUNCTION_NAMES:
        value = getattr(module, fname, None)
        if value is not None and not callable(value):
            raise UserError(f"{path}: {fname} is not a function (it is of type {type(value).__name__})")
        if value is not None:
            functions[fname] = value
    if not functions:
        raise UserError(
            f"{path}: defines none of {', '.join(FUNCTION_NAMES)}; `backprop-ninja exercise FILE` writes a starter"
        )
    return functions


# ---------------------------------------------------------------------------------------------
# what the solution receives


class LectureTensors:
    """`t`: the lecture's batch, parameters and forward pass by their lecture names, read-only.

    t.h or t["h"]; dir(t) lists them all. Every tensor is a copy made for this one call.
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: dict[str, Any]):
        object.__setattr__(self, "_tensors", tensors)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_tensors":
            raise AttributeError(name)
        try:
            return self._tensors[name]
        except KeyError:
            raise AttributeError(f"t has no {name!r}; it holds {', '.join(self._tensors)}") from None

    def __getitem__(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"t has no {name!r}; it holds {', '.join(self._tensors)}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"t is read-only (t.{name} = ...): keep your gradients in your own variables")

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __dir__(self) -> list[str]:
        return list(self._tensors)

    def __repr__(self) -> str:
        parts = (f"{k}{tuple(v.shape)}" if isinstance(v, Tensor) else f"{k}={v}" for k, v in self._tensors.items())
        return f"t({', '.join(parts)})"


def fresh_inputs(s: LectureSetup) -> LectureTensors:
    """A new `t` of copies: the parameters, Xb, Yb, n, then the 20 intermediates in forward order."""
    named = {**{k: s.params[k] for k in lecture.PARAM_NAMES}, "Xb": s.Xb, "Yb": s.Yb, "n": s.Xb.shape[0],
             **s.t._asdict()}  # fmt: skip
    return LectureTensors({k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in named.items()})


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class SolutionError:
    """An exception raised by the learner's function, located in the learner's own code."""

    type: str  # e.g. "RuntimeError"
    message: str
    location: str | None  # "sol.py:42" (the innermost line of the learner's code)
    source: str | None  # that line's text

    def __str__(self) -> str:
        text = f"raised {self.type}: {self.message}" if self.message else f"raised {self.type}"
        if self.location:
            text += f"\n  at {self.location}" + (f": {self.source}" if self.source else "")
        return text


@dataclass
class GradedRow:
    """One row of the table. status: right, warning (right values, shape differs), wrong, missing."""

    name: str
    status: str
    row: Row | None  # compare()'s row; None when missing
    shape: tuple[int, ...] | None  # the learner's gradient's shape
    expected_shape: tuple[int, ...]

    def __str__(self) -> str:
        return format_row(self.row) if self.row is not None else f"{self.name:15s} | missing"


@dataclass
class ExerciseResult:
    function: str  # "backward", "cross_entropy_backward", "batchnorm_backward"
    title: str
    rows: list[GradedRow] = field(default_factory=list)
    first_divergence: str | None = None
    diagnoses: list[str] = field(default_factory=list)  # about the first divergence
    warnings: list[str] = field(default_factory=list)  # right, but worth changing
    notes: list[str] = field(default_factory=list)  # right, though the row's `approximate` says False
    error: SolutionError | None = None

    @property
    def missing(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "missing"]

    @property
    def wrong(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "wrong"]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.missing and not self.wrong

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return f"raised {self.error.type}"
        if self.wrong:
            return f"wrong from {self.first_divergence}"
        if self.missing:
            return "missing" if len(self.rows) == 1 else f"{len(self.missing)} of {len(self.rows)} missing"
        return "right"


@dataclass
class GradeResult:
    """What `grade()` returns: str() is the report, .ok the verdict, .exercises the details."""

    source: str  # the solution file, or FROM_PYTHON
    seed: int
    batch_size: int
    n_hidden: int
    exercises: dict[str, ExerciseResult]  # by function name, in exercise order

    @property
    def ok(self) -> bool:
        return all(ex.ok for ex in self.exercises.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        verdicts = ", ".join(f"{name}: {ex.verdict}" for name, ex in self.exercises.items())
        return f"<GradeResult ok={self.ok}: {verdicts}>"

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(format_report(self))}</pre>"


# ---------------------------------------------------------------------------------------------
# grading


def grade(
    backward: Callable | None = None,
    cross_entropy_backward: Callable | None = None,
    batchnorm_backward: Callable | None = None,
    *,
    file: str | os.PathLike | None = None,
    seed: int = LECTURE_SEED,
    batch_size: int = 32,
    n_hidden: int = LECTURE_HIDDEN,
    input: str | os.PathLike | None = None,
    verbose: bool = True,
) -> GradeResult:
    """Grade a backward pass against autograd on the lecture's batch; print the report if verbose.

        result = backprop_ninja.grade(backward=my_backward)       # from a notebook
        result = backprop_ninja.grade(file="sol.py")              # or a solution file
        result.ok, result.exercises["backward"].first_divergence

    Functions passed explicitly take the place of the file's functions of the same name.
    """
    given = {"backward": backward, "cross_entropy_backward": cross_entropy_backward,
             "batchnorm_backward": batchnorm_backward}  # fmt: skip
    functions = load_solution(file) if file is not None else {}
    functions.update({k: fn for k, fn in given.items() if fn is not None})
    if not functions:
        raise UserError("nothing to grade: pass backward=, cross_entropy_backward=, batchnorm_backward= or file=")
    if batch_size < 3:
        raise UserError(
            f"batch size {batch_size} cannot be graded: BatchNorm over two examples normalises every value to "
            "+-0.707, so the gradient through it is rounding noise; use a batch of 3 or more"
        )

    setup = lecture_setup(seed, batch_size, n_hidden, None if input is None else str(input))
    learner_files = {str(file)} if file is not None else set()
    learner_files |= {fn.__code__.co_filename for fn in functions.values() if hasattr(fn, "__code__")}
    exercises = {
        ex.function: grade_exercise(ex, functions[ex.function], setup, learner_files)
        for ex in EXERCISES
        if ex.function in functions
    }
    source = str(file) if file is not None else FROM_PYTHON
    result = GradeResult(source, seed, batch_size, n_hidden, exercises)
    if verbose:
        print(format_report(result))
    return result


def grade_exercise(ex: Exercise, fn: Callable, s: LectureSetup, learner_files: set[str]) -> ExerciseResult:
    """Call the learner's function on copies, then compare, diagnose and warn."""
    result = ExerciseResult(ex.function, ex.title)
    try:
        if ex.function == "backward":
            returned = fn(fresh_inputs(s))
        elif ex.function == "cross_entropy_backward":
            returned = fn(s.t.logits.clone(), s.Yb.clone())
        else:
            returned = fn(fresh_inputs(s), s.reference["hpreact"].clone())
    except (Exception, SystemExit) as err:
        message = " ".join(str(err).split())
        result.error = SolutionError(type(err).__name__, message, _location(err, learner_files),
                                     _source_line(err, learner_files))  # fmt: skip
        return result

    if ex.function == "backward":
        grads = _gradients_by_name(returned, result.warnings)
    else:
        grads = {ex.names[0]: returned}

    for name in ex.names:
        result.rows.append(grade_row(name, grads.get(name), s.reference[name], _scale(name, s)))
    for r in result.rows:
        if r.status == "warning":
            result.warnings.append(_shape_warning(r.name, r.shape, r.expected_shape))
        if r.status in ("right", "warning") and not r.row.approximate:
            result.notes.append(_rounding_note(r, _scale(r.name, s)))

    wrong = [r.name for r in result.rows if r.status == "wrong"]
    if wrong:
        first = result.first_divergence = wrong[0]
        result.diagnoses = diagnose(first, grads, s)
        if len(wrong) > 1:
            result.diagnoses.append(
                f"{len(wrong) - 1} later row{'s are' if len(wrong) > 2 else ' is'} wrong too; "
                f"they may only inherit this error: fix d{first} first"
            )
    return result


def _scale(name: str, s: LectureSetup) -> float:
    return lecture.gradient_scale(name, s.reference)


def _gradients_by_name(returned: Any, warnings: list[str]) -> dict[str, Any]:
    """backward's dict, keyed by table names: 'dlogprobs' and 'logprobs' both mean logprobs."""
    if not isinstance(returned, dict):
        warnings.append(f"backward(t) returned a {type(returned).__name__}, not a dict {{name: gradient}}")
        return {}
    table = set(lecture.BACKWARD_ORDER)
    grads: dict[str, Any] = {}
    unknown = []
    for key, value in returned.items():
        name = key[1:] if isinstance(key, str) and key not in table and key[1:] in table and key[0] == "d" else key
        if name not in table:
            unknown.append(repr(key))
        elif name in grads:
            warnings.append(f"two keys for {name} ({name!r} and 'd{name}'): graded the last one")
            grads[name] = value
        else:
            grads[name] = value
    if unknown:
        warnings.append(f"ignored keys that are not rows of the table: {', '.join(unknown)}")
    return grads


def grade_row(name: str, mine: Any, reference: Tensor, scale: float) -> GradedRow:
    """The lecture's row; its status adds what the row alone cannot say: shapes, and rounding on
    entries near 0 (right when maxdiff <= ROUNDING_RTOL * scale, the largest gradient of its kind)."""
    expected = tuple(reference.shape)
    if mine is None:
        return GradedRow(name, "missing", None, None, expected)
    if not isinstance(mine, Tensor):
        return GradedRow(name, "wrong", Row(name, False, False, math.nan), None, expected)
    row = compare(name, mine.detach(), reference)
    shape = tuple(mine.shape)
    if not within_rounding(row, scale):
        status = "wrong"
    elif shape == expected:
        status = "right"
    else:  # right once broadcast; a gradient larger than its tensor is wrong (it was not summed)
        status = "warning" if mine.numel() <= reference.numel() else "wrong"
    return GradedRow(name, status, row, shape, expected)


# ---------------------------------------------------------------------------------------------
# diagnoses: why the first wrong gradient is wrong


def diagnose(name: str, grads: dict[str, Any], s: LectureSetup) -> list[str]:
    mine, ref = grads[name], s.reference[name]
    if not isinstance(mine, Tensor):
        return [f"d{name} is a {type(mine).__name__}, not a tensor"]
    mine = mine.detach().to(ref.dtype)
    notes = []
    values = _as_reference_shape(mine, ref)
    if mine.shape != ref.shape:
        transposed = mine.dim() == 2 and mine.T.shape == ref.shape and _close(mine.T, ref)
        if transposed:
            return [_transpose_note(name, mine.shape, ref.shape)]
        notes.append(_shape_note(name, mine.shape, ref.shape))
    if values is not None:
        shared = _shared_memory_note(name, mine, grads, s.reference)
        value_note = shared or _value_note(name, values, ref, s)
        if value_note:
            notes.append(value_note)
    return notes


def _as_reference_shape(mine: Tensor, ref: Tensor) -> Tensor | None:
    """mine laid out as ref, where that means something: same numbers reshaped, or broadcast up."""
    if mine.shape == ref.shape:
        return mine
    if mine.numel() == ref.numel() and _squeezed(mine.shape) == _squeezed(ref.shape):
        return mine.reshape(ref.shape)
    try:
        return torch.broadcast_to(mine, ref.shape)
    except RuntimeError:
        return None


def _value_note(name: str, values: Tensor, ref: Tensor, s: LectureSetup) -> str | None:
    n = s.Xb.shape[0]
    if not torch.isfinite(values).all():
        return f"d{name} holds nan or inf: a division by zero, or the log of 0?"
    if not values.any() and ref.any():
        return f"d{name} is all zeros: not filled in yet, or its branch was forgotten"
    if values.dim() == 2 and values.shape[0] == values.shape[1] and _close(values.T, ref):
        return _transpose_note(name, values.shape, ref.shape)
    return _factor_note(name, values, ref, n) or _branch_note(name, values, s) or _embedding_note(name, values, s)


def _factor_note(name: str, values: Tensor, ref: Tensor, n: int) -> str | None:
    """Fit values = k * ref; name k when it is one of the lecture's usual slips."""
    v, r = values.double(), ref.double()
    scale = r.abs().max()
    if scale == 0:
        return None
    k = float((v * r).sum() / (r * r).sum())
    if (v - k * r).abs().max() > FACTOR_FIT_RTOL * scale:
        return None  # not a constant factor
    named = [
        (n, f"n = {n} times too large: a missing 1/n (the loss is the mean over the n examples)"),
        (1 / n, f"n = {n} times too small: a 1/n too many"),
        ((n - 1) / n, "(n-1)/n of the right value: a 1/n where the forward pass divides by n-1 "
                      "(Bessel's correction: bnvar = 1/(n-1) * bndiff2.sum(0, keepdim=True))"),
        (n / (n - 1), "n/(n-1) of the right value: a 1/(n-1) where the forward pass divides by n "
                      "(bnmeani = 1/n * hprebn.sum(0, keepdim=True))"),
        (n - 1, f"n-1 = {n - 1} times too large: a missing 1/(n-1)"),
        (1 / (n - 1), f"n-1 = {n - 1} times too small: a 1/(n-1) too many"),
        (2, "twice the right value: a factor 2 too many, or one branch counted twice"),
        (0.5, "half the right value: a missing factor 2 (the local derivative of x**2 is 2*x)"),
    ]  # fmt: skip
    flipped = k < 0
    if math.isclose(abs(k), 1, rel_tol=FACTOR_MATCH_RTOL):
        return f"d{name} has its sign flipped: yours is minus the right gradient" if flipped else None
    for factor, why in named:
        if math.isclose(abs(k), factor, rel_tol=FACTOR_MATCH_RTOL):
            return f"d{name} is {why}" + ("; and its sign is flipped" if flipped else "")
    return f"d{name} is {k:.6g} times the right gradient: a constant factor is off"


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
    if name not in BRANCHES:
        return None
    first, second = BRANCHES[name]
    for only, forgotten in ((first, second), (second, first)):
        if _close(values, only.gradient(s)):
            return (
                f"d{name} holds only the gradient through `{only.via}`; {name} is used twice in the forward "
                f"pass: add the gradient through `{forgotten.via}`"
            )
    return None


def _embedding_note(name: str, values: Tensor, s: LectureSetup) -> str | None:
    """emb = C[Xb]: a row of C looked up k times gets the sum of k gradients, not the last one."""
    if name != "C":
        return None
    ref = s.reference["C"]
    repeated = torch.bincount(s.Xb.reshape(-1), minlength=ref.shape[0]) > 1  # (V,)
    wrong_rows = ~torch.isclose(values, ref, rtol=APPROX_RTOL, atol=_atol(ref)).all(1)  # (V,)
    if wrong_rows.any() and not (wrong_rows & ~repeated).any():
        return (
            "only the rows of C looked up more than once in Xb are wrong: each lookup adds its gradient "
            "to the row; accumulate (+= in the loop, or index_add_), do not assign"
        )
    return None


def _shared_memory_note(name: str, mine: Tensor, grads: dict[str, Any], reference: dict[str, Tensor]) -> str | None:
    """mine shares memory with another gradient AND holds its numbers, though the two should differ.

    Views such as demb = dembcat.view(...) share memory legitimately: their references agree too.
    """
    ptr = mine.untyped_storage().data_ptr()
    for other, theirs in grads.items():
        if other == name or not isinstance(theirs, Tensor) or theirs.untyped_storage().data_ptr() != ptr:
            continue
        if theirs.numel() != mine.numel() or not _close(mine.reshape(-1), theirs.detach().reshape(-1)):
            continue
        ref_a, ref_b = reference[name], reference[other]
        if ref_a.numel() == ref_b.numel() and _close(ref_a.reshape(-1), ref_b.reshape(-1)):
            continue
        earlier, later = sorted((name, other), key=lecture.BACKWARD_ORDER.index)
        return (
            f"d{name} shares its memory with d{other} and holds d{other}'s numbers: an in-place += on one "
            f"changed the other. A missing .clone() before +=: d{later} = d{earlier}.clone()"
        )
    return None


# the wording of shape problems

BROADCAST_RULE = "a broadcast in the forward pass is a sum in the backward pass"


def _shape_note(name: str, shape: torch.Size, expected: torch.Size) -> str:
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
    return f"{head}: a gradient has its tensor's shape; {BROADCAST_RULE}"


def _shape_warning(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    head = f"d{name} has shape {_fmt(shape)} but {name} has shape {_fmt(expected)}; it is right once broadcast"
    if math.prod(shape) < math.prod(expected):
        return f"{head}, but a gradient has its tensor's shape: expand it, e.g. * torch.ones_like(t.{name})"
    if len(shape) < len(expected):
        return f"{head}: keepdim=True in the sum that made it keeps the shape (e.g. .sum(0, keepdim=True))"
    if len(shape) > len(expected):
        return f"{head}: sum without keepdim=True (or .view({_fmt(expected)[1:-1]}))"
    return f"{head}: .view{_fmt(expected)} gives it its tensor's shape"


def _rounding_note(r: GradedRow, scale: float) -> str:
    head = f"{r.name} is right: approximate says False, but maxdiff {r.row.maxdiff:.2g} is float32 rounding"
    if r.name in lecture.ZERO_GRADIENTS:
        source, why = lecture.ZERO_GRADIENTS[r.name]
        return f"{head}. Its exact gradient is 0 ({why}): yours and autograd's are noise beside d{source}'s {scale:.2g}"
    return f"{head}, {r.row.maxdiff / scale:.1g} of its largest entry; allclose's absolute 1e-8 is strict near 0"


def _transpose_note(name: str, shape: torch.Size, expected: torch.Size) -> str:
    return (
        f"d{name} is the transpose of the right gradient (yours {_fmt(shape)}, {name} {_fmt(expected)}): "
        "for out = x @ W, dx = dout @ W.T and dW = x.T @ dout"
    )


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


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _close(a: Tensor, b: Tensor) -> bool:
    """As a row's status: allclose, or within rounding of the largest entry."""
    return a.shape == b.shape and torch.allclose(a.to(b.dtype), b, rtol=APPROX_RTOL, atol=_atol(b))


def _atol(reference: Tensor) -> float:
    return max(APPROX_ATOL, ROUNDING_RTOL * float(reference.abs().max())) if reference.numel() else APPROX_ATOL


# ---------------------------------------------------------------------------------------------
# exceptions in the learner's code


def _learner_frame(err: BaseException, learner_files: set[str]) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that runs the learner's own code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in learner_files]
    return frames[-1] if frames else None


def _location(err: BaseException, learner_files: set[str]) -> str | None:
    frame = _learner_frame(err, learner_files)
    return f"{_display_path(frame.filename)}:{frame.lineno}" if frame else None


def _source_line(err: BaseException, learner_files: set[str]) -> str | None:
    frame = _learner_frame(err, learner_files)
    return frame.line.strip() if frame and frame.line else None


def _display_path(filename: str) -> str:
    """Relative to the working directory when the file is under it, else as it is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return relative if os.path.isabs(filename) and not relative.startswith("..") else filename


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# ---------------------------------------------------------------------------------------------
# the report


def format_report(result: GradeResult) -> str:
    lines = [
        f"grading {result.source} against autograd "
        f"(seed {result.seed}, batch {result.batch_size}, hidden {result.n_hidden})",
        "",
    ]
    for ex in result.exercises.values():
        lines.append(ex.title)
        if ex.error is not None:
            lines.append(f"{ex.function} {ex.error}")
        for r in ex.rows:
            lines.append(str(r) + ("  <- first divergence" if r.name == ex.first_divergence else ""))
        if ex.first_divergence:
            lines.append(f"first divergence: {ex.first_divergence}")
            lines.extend(f"  {note}" for note in ex.diagnoses)
        lines.extend(f"warning: {w}" for w in ex.warnings)
        lines.extend(f"note: {note}" for note in ex.notes)
        if len(ex.missing) == len(ex.rows) > 1:
            lines.append(f"missing: all {len(ex.rows)}; start with d{ex.rows[0].name}, at the top")
        elif ex.missing and len(ex.rows) > 1:
            lines.append(f"missing: {len(ex.missing)} of {len(ex.rows)} ({', '.join(ex.missing)})")
        lines.append("")
    lines.append(_summary(result))
    return "\n".join(lines)


def _summary(result: GradeResult) -> str:
    absent = [f for f in FUNCTION_NAMES if f not in result.exercises]
    not_tried = f" ({', '.join(absent)} not defined)" if absent and result.source != FROM_PYTHON else ""
    if result.ok:
        return f"result: every gradient is right{not_tried}"
    todo = "; ".join(f"{ex.function} {ex.verdict}" for ex in result.exercises.values() if not ex.ok)
    if len(result.exercises) == 1:
        return f"result: {todo}{not_tried}"
    right = sum(ex.ok for ex in result.exercises.values())
    return f"result: {right} of {len(result.exercises)} exercises right; {todo}{not_tried}"


# ---------------------------------------------------------------------------------------------
# the CLI


def run_check_solution(args: argparse.Namespace) -> int:
    """`backprop-ninja check --solution FILE`."""
    if args.model != "mlp":
        raise UserError(f"--solution grades the lecture network; --model {args.model} does not apply")
    if args.numerical:
        raise UserError("--solution and --numerical do not combine: the grader compares with autograd")
    hidden = args.hidden or LECTURE_HIDDEN
    result = grade(file=args.solution, seed=args.seed, batch_size=args.batch_size, n_hidden=hidden, input=args.input)
    return result.exit_code


def run_exercise(args: argparse.Namespace) -> int:
    """`backprop-ninja exercise FILE [--force]`: write the starter solution."""
    dest = Path(args.file)
    if dest.is_dir():
        raise UserError(f"{dest}: is a directory; give the path of the file to write")
    if dest.exists() and not args.force:
        raise UserError(f"{dest}: already exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise UserError(f"{dest.parent}: no such directory")
    text = Path(__file__).with_name("solution_template.py").read_text(encoding="utf-8")
    try:
        atomic_write(dest, text.encode("utf-8"))
    except OSError as err:
        raise UserError(f"{dest}: cannot write ({err.strerror})") from None
    print(f"wrote {dest}: fill in the gradients, one line at a time, then run")
    print(f"  backprop-ninja check --solution {shlex.quote(str(dest))}")
    return 0
