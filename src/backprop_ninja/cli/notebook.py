"""`backprop-ninja check --notebook NB [NB ...]`: grade learners' own notebooks (grading.notebook).

One notebook: its report. Several: one summary line each, then a table of their exercises. --json:
one JSON record per notebook, one per line. Exit 0 when every notebook's attempted exercises are
right, 1 when something is wrong, raised or timed out, 2 when a notebook cannot be graded.
"""

from __future__ import annotations

import argparse
import sys

from backprop_ninja.errors import UserError
from backprop_ninja.grading.notebook import grade_notebook
from backprop_ninja.grading.notebook_results import NotebookResult, format_many

PROG = "backprop-ninja"


def run(args: argparse.Namespace) -> int:
    if args.solution:
        raise UserError("--notebook and --solution do not combine: grade one at a time")
    if args.numerical:
        raise UserError("--notebook and --numerical do not combine: the grader compares with autograd")
    exercises = parse_exercises(args.exercises)
    results = []
    for path in args.notebook:
        try:
            result = grade_notebook(path, data=args.data, timeout=args.timeout, exercises=exercises, verbose=False)
        except UserError as err:
            message = str(err).removeprefix(f"{path}: ")
            result = NotebookResult(str(path), {}, cannot_grade=message)
        results.append(result)
    if args.json:
        for result in results:
            print(result.to_json())
    elif len(results) == 1 and results[0].cannot_grade is not None:
        print(f"{PROG}: error: {results[0].summary()}", file=sys.stderr)
    elif len(results) == 1:
        print(results[0])
    else:
        print(format_many(results))
    return max(r.exit_code for r in results)


def parse_exercises(text: str) -> tuple[int, ...]:
    try:
        numbers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise UserError(f"--exercises: expected numbers among 1,2,3,4 separated by commas, got {text!r}") from None
    if not numbers or any(k not in (1, 2, 3, 4) for k in numbers):
        raise UserError(f"--exercises: expected numbers among 1,2,3,4, got {text!r}")
    return numbers
