"""What grading returns, and its report: str() of a GradeResult is the text `check --solution` prints.

    GradeResult        one solution: .ok, .exit_code, .exercises[function]
    ExerciseResult     one exercise: its rows, first divergence, diagnoses, warnings, notes, error
    GradedRow          one row: the lecture's row (shown) and the verdict (decided)
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field

from backprop_ninja.checking.verdict import Row, format_row
from backprop_ninja.lecture.exercises import FUNCTION_NAMES

FROM_PYTHON = "your functions"  # the report's name for functions passed to grade() directly


@dataclass
class SolutionError:
    """What went wrong while the learner's code ran: an exception located in the learner's own
    code, or the process that ran it stopping (a time limit, os._exit, a crash)."""

    type: str  # e.g. "RuntimeError"; "TimeoutError" for a time limit; "Crash" for a process that died
    message: str
    location: str | None = None  # "sol.py:42" (the innermost line of the learner's code)
    source: str | None = None  # that line's text

    def __str__(self) -> str:
        if self.type == "Crash":
            text = self.message
        elif self.type == "TimeoutError":
            text = f"timed out: {self.message}"
        else:
            text = f"raised {self.type}: {self.message}" if self.message else f"raised {self.type}"
        if self.location:
            text += f"\n  at {self.location}" + (f": {self.source}" if self.source else "")
        return text


@dataclass
class GradedRow:
    """One row of the table. status: right, warning (right values, shape differs), wrong, missing."""

    name: str
    status: str
    row: Row | None  # the lecture's float32 row; None when missing
    shape: tuple[int, ...] | None  # the learner's gradient's shape
    expected_shape: tuple[int, ...]
    reason: str | None = None  # why the verdict is wrong, one line

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
    notes: list[str] = field(default_factory=list)  # where the verdict and the row's `approximate` disagree
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
            return {"TimeoutError": "timed out", "Crash": "crashed"}.get(self.error.type, f"raised {self.error.type}")
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

    def to_json(self) -> str:
        """Machine-readable: every exercise's rows, verdicts, first divergence, diagnoses and errors."""
        record = asdict(self)
        for ex in record["exercises"].values():
            for row in ex["rows"]:
                row["row"] = row["row"] and dict(zip(Row._fields, row["row"]))
        return json.dumps({"ok": self.ok, **record}, allow_nan=True)


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
    lines.append(summary(result))
    return "\n".join(lines)


def summary(result: GradeResult) -> str:
    absent = [f for f in FUNCTION_NAMES if f not in result.exercises]
    not_tried = f" ({', '.join(absent)} not defined)" if absent and result.source != FROM_PYTHON else ""
    if result.ok:
        return f"result: every gradient is right{not_tried}"
    todo = "; ".join(f"{ex.function} {ex.verdict}" for ex in result.exercises.values() if not ex.ok)
    if len(result.exercises) == 1:
        return f"result: {todo}{not_tried}"
    right = sum(ex.ok for ex in result.exercises.values())
    return f"result: {right} of {len(result.exercises)} exercises right; {todo}{not_tried}"
