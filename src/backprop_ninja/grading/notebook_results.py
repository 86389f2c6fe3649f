"""What grading a notebook returns, and its report: str() of a NotebookResult is what
`backprop-ninja check --notebook FILE` prints.

    NotebookResult     one notebook: .ok, .exit_code, .exercises[N], .errors, .to_json()
    NotebookExercise   one exercise: its rows, first divergence and why, where in the notebook
    NotebookRow        one row: the lecture's row (shown) and the verdict (decided)
    CellProblem        a cell that raised, timed out, or was not run
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field

from backprop_ninja.checking.verdict import Row, format_row

TITLES = {
    1: "Exercise 1: backprop through every intermediate, one by one",
    2: "Exercise 2: cross-entropy backward in one go",
    3: "Exercise 3: batchnorm backward in one go",
    4: "Exercise 4: the training loop with your own backward pass",
}


@dataclass
class Where:
    """A place in the learner's notebook: cell position (1-based, markdown counted), its saved
    In [n], and a line of its source."""

    cell: int
    saved_count: int | None
    line: int | None = None
    source: str | None = None

    def __str__(self) -> str:
        shown = f"In [{self.saved_count}]" if self.saved_count is not None else "In [ ]"
        text = f"cell {self.cell} ({shown})"
        if self.line is not None:
            text += f", line {self.line}"
        if self.source:
            text += f": {self.source}"
        return text


@dataclass
class CellProblem:
    kind: str  # "raised", "timed out", "not run"
    type: str | None  # the exception's type, e.g. "NameError"
    message: str
    where: Where

    def __str__(self) -> str:
        head = f"cell {self.where.cell} ({'In [%s]' % self.where.saved_count if self.where.saved_count else 'In [ ]'})"
        if self.kind == "raised":
            text = f"{head} raised {self.type}: {self.message}" if self.message else f"{head} raised {self.type}"
        else:
            text = f"{head} {self.message}"
        if self.where.line is not None:
            text += f"\n  at line {self.where.line}" + (f": {self.where.source}" if self.where.source else "")
        return text


@dataclass
class NotebookRow:
    """status: right, warning (right values, a shape that differs in size-1 dims), wrong,
    not attempted (still None or not defined), unchecked (autograd has no .grad to compare with)."""

    name: str  # the tensor's name in the notebook (the cmp label where it names none)
    label: str  # what the learner's cmp printed first
    status: str
    row: Row | None
    reason: str | None = None
    step: int | None = None  # Exercise 4: the step of the training loop
    where: Where | None = None

    def __str__(self) -> str:
        if self.row is not None:
            return format_row(self.row._replace(name=self.label))
        what = {"not attempted": "not attempted (still None)"}.get(self.status, f"{self.status}: {self.reason}")
        return f"{self.label:15s} | {what}"


@dataclass
class NotebookExercise:
    number: int
    title: str
    found_by: str  # "cmp", "variables", "training loop", or "" when nothing was found
    rows: list[NotebookRow] = field(default_factory=list)
    first_divergence: str | None = None
    where: Where | None = None  # of the first divergence
    diagnoses: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[CellProblem] = field(default_factory=list)  # in this exercise's cells
    steps: int = 0  # Exercise 4: steps of the training loop checked

    @property
    def wrong(self) -> list[NotebookRow]:
        return [r for r in self.rows if r.status == "wrong"]

    @property
    def attempted(self) -> bool:
        return any(r.status in ("right", "warning", "wrong") for r in self.rows)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.wrong

    @property
    def verdict(self) -> str:
        if self.wrong:
            at = f" at step {self.rows[0].step}" if self.number == 4 and self.wrong[0].step is not None else ""
            return f"wrong from {self.first_divergence}{at}"
        if self.errors:
            return self.errors[0].kind if self.errors[0].kind != "raised" else f"raised {self.errors[0].type}"
        if not self.rows:
            return "not found" if not self.found_by else "not run"
        if not self.attempted:
            return "not attempted"
        graded = [r for r in self.rows if r.status in ("right", "warning")]
        if len(graded) < len(self.rows):
            return f"right ({len(graded)} of {len(self.rows)} rows attempted)"
        return "right"


@dataclass
class NotebookResult:
    path: str
    exercises: dict[int, NotebookExercise]
    errors: list[CellProblem] = field(default_factory=list)  # every cell that raised or timed out, in order
    out_of_order: str | None = None
    notes: list[str] = field(default_factory=list)  # what the grader changed to run it
    seconds: float = 0.0
    cannot_grade: str | None = None  # why the notebook could not be graded at all (exit 2)

    @property
    def attempted(self) -> bool:
        return any(ex.attempted for ex in self.exercises.values())

    @property
    def ok(self) -> bool:
        return (self.cannot_grade is None and not self.errors and self.attempted
                and all(ex.ok for ex in self.exercises.values()))

    @property
    def exit_code(self) -> int:
        if self.cannot_grade is not None:
            return 2
        return 0 if self.ok else 1

    def summary(self) -> str:
        """One line: the notebook, and its verdict."""
        if self.cannot_grade is not None:
            return f"{self.path}: cannot be graded: {self.cannot_grade}"
        parts = [f"Exercise {k} {ex.verdict}" for k, ex in self.exercises.items()]
        head = "right" if self.ok else ("nothing attempted" if not self.attempted and not self.errors else "wrong")
        if self.errors and self.ok is False and all(ex.ok for ex in self.exercises.values()):
            head = "does not run top to bottom"
        return f"{self.path}: {head}; " + "; ".join(parts) + f" ({self.seconds:.1f} s)"

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        return f"<NotebookResult ok={self.ok}: {self.summary()}>"

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(format_report(self))}</pre>"

    def to_dict(self) -> dict:
        record = asdict(self)
        for number, ex in record["exercises"].items():
            for row in ex["rows"]:
                row["row"] = row["row"] and dict(zip(Row._fields, row["row"]))
            ex["verdict"] = self.exercises[number].verdict
            ex["ok"] = self.exercises[number].ok
        record["exercises"] = {str(k): v for k, v in record["exercises"].items()}
        return {"ok": self.ok, "exit_code": self.exit_code, "summary": self.summary(), **record}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=True)


# ---------------------------------------------------------------------------------------------
# the report


def format_report(result: NotebookResult) -> str:
    if result.cannot_grade is not None:
        return result.summary()
    lines = [f"grading {result.path}: every code cell in a fresh kernel, top to bottom, against autograd", ""]
    if result.errors:
        first = result.errors[0]
        lines.append(f"does not run top to bottom: {first}")
        if len(result.errors) > 1:
            lines.append(f"  ({len(result.errors) - 1} later cell{'s' if len(result.errors) > 2 else ''} "
                         "raised or timed out too; fix the first one first)")
        lines.append("")
    if result.out_of_order:
        lines += [f"note: {result.out_of_order}", ""]
    for ex in result.exercises.values():
        lines.append(ex.title + (f" ({ex.steps} steps checked, each against autograd on the same batch)"
                                 if ex.number == 4 and ex.steps else ""))
        for r in ex.rows:
            lines.append(str(r) + ("  <- first divergence" if ex.first_divergence and r.name == ex.first_divergence
                                   and r.status == "wrong" else ""))
        if ex.first_divergence:
            lines.append(f"first divergence: d{ex.first_divergence}" + (f", {ex.where}" if ex.where else ""))
            lines.extend(f"  {note}" for note in ex.diagnoses)
        for problem in ex.errors:
            if problem is not (result.errors[0] if result.errors else None):
                lines.append(f"{problem}")
        lines.extend(f"warning: {r.reason}" for r in ex.rows if r.status == "warning")
        lines.extend(f"note: {note}" for note in ex.notes)
        if not ex.rows and not ex.errors:
            lines.append("not found in the notebook" if not ex.found_by else "its cells did not run")
        elif not ex.attempted and ex.rows and not ex.errors:
            lines.append("not attempted: every gradient is still None (or not defined yet)")
        lines.append("")
    lines.extend(f"note: {note}" for note in result.notes)
    if result.notes:
        lines.append("")
    lines.append("result: " + result.summary().split(": ", 1)[1])
    return "\n".join(lines)


def format_many(results: list[NotebookResult]) -> str:
    """Several notebooks: one summary line each, then a table of the exercises' verdicts."""
    numbers = sorted({k for r in results for k in r.exercises})
    table = [["notebook", *(f"Exercise {k}" for k in numbers)]]
    for r in results:
        table.append([r.path, *("cannot be graded" if r.cannot_grade else
                                r.exercises[k].verdict if k in r.exercises else "-" for k in numbers)])
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = [r.summary() for r in results] + [""]
    lines += [" | ".join(f"{cell:{w}s}" for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
