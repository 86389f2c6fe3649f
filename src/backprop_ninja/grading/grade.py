"""Grade a learner's own backward pass: `backprop-ninja check --solution FILE`, `backprop_ninja.grade()`.

A solution defines any of the lecture's three exercises (grading.solution). Each one is called on
fresh copies of the lecture's batch twice: in float32, the lecture's own run, whose rows are the
table, and in float64, where rounding is about 1e-16 and a slip like n/(n-1) stands out at any
batch. A file runs in a child process with a time limit (grading.isolation); the references are
computed here, where the learner's code cannot reach them.

Each row's verdict is the package's one policy (checking.verdict). Where a gradient is wrong, the
report names the first divergence in backward order and says why whenever the numbers tell
(grading.diagnoses). Gradients that are wrong only because an earlier one is wrong are listed,
not diagnosed.

Exit codes of the CLI: 0 every gradient given is right and none is missing; 1 something is wrong,
missing, raised or timed out; 2 the file cannot be graded (UserError).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backprop_ninja.checking.verdict import Row, compare, judge, rounding_bound
from backprop_ninja.conventions import LECTURE_SEED
from backprop_ninja.errors import UserError
from backprop_ninja.grading import diagnoses
from backprop_ninja.grading.isolation import DEFAULT_TIMEOUT_S, Outcome, run_solution
from backprop_ninja.grading.results import FROM_PYTHON, ExerciseResult, GradedRow, GradeResult, SolutionError
from backprop_ninja.grading.solution import (
    Foreign, Returned, as_returned, call_exercise, lecture_inputs, solution_error,
)
from backprop_ninja.lecture import network
from backprop_ninja.lecture.exercises import EXERCISES, FUNCTION_NAMES, Exercise
from backprop_ninja.lecture.fixture import LECTURE_BATCH, LECTURE_HIDDEN, LectureSetup, lecture_setup

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def grade(
    backward: Callable | None = None,
    cross_entropy_backward: Callable | None = None,
    batchnorm_backward: Callable | None = None,
    *,
    file: str | os.PathLike | None = None,
    seed: int = LECTURE_SEED,
    batch_size: int = LECTURE_BATCH,
    n_hidden: int = LECTURE_HIDDEN,
    input: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    verbose: bool = True,
) -> GradeResult:
    """Grade a backward pass against autograd on the lecture's batch; print the report if verbose.

        result = backprop_ninja.grade(backward=my_backward)       # from a notebook
        result = backprop_ninja.grade(file="sol.py")              # or a solution file
        result.ok, result.exercises["backward"].first_divergence

    A file runs in a child process, each call within `timeout` seconds. Functions passed explicitly
    run in this process and take the place of the file's functions of the same name.
    """
    given = {"backward": backward, "cross_entropy_backward": cross_entropy_backward,
             "batchnorm_backward": batchnorm_backward}  # fmt: skip
    given = {k: fn for k, fn in given.items() if fn is not None}
    if file is None and not given:
        raise UserError("nothing to grade: pass backward=, cross_entropy_backward=, batchnorm_backward= or file=")
    if batch_size < 3:
        raise UserError(
            f"batch size {batch_size} cannot be graded: BatchNorm over two examples normalises every value to "
            "+-0.707, so the gradient through it is rounding noise; use a batch of 3 or more"
        )
    if file is not None:
        _check_file(Path(file))

    input_path = None if input is None else str(input)
    setups = {name: lecture_setup(seed, batch_size, n_hidden, input_path, dtype) for name, dtype in DTYPES.items()}
    inputs = {name: lecture_inputs(s) for name, s in setups.items()}
    outcomes: dict[tuple[str, str], Outcome] = {}
    defined = set(given)
    if file is not None:
        from_file = [f for f in FUNCTION_NAMES if f not in given]
        in_file, outcomes = run_solution(Path(file), from_file, inputs, timeout)
        defined |= set(in_file)
    learner_files = {fn.__code__.co_filename for fn in given.values() if hasattr(fn, "__code__")}
    for function, fn in given.items():
        outcomes |= _call_here(fn, function, inputs, learner_files)

    exercises = {ex.function: grade_exercise(ex, setups, outcomes) for ex in EXERCISES if ex.function in defined}
    source = str(file) if file is not None else FROM_PYTHON
    result = GradeResult(source, seed, batch_size, n_hidden, exercises)
    if verbose:
        print(result)
    return result


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a Python file")


def _call_here(fn: Callable, function: str, inputs: dict[str, dict[str, Tensor]], learner_files: set[str]
               ) -> dict[tuple[str, str], Outcome]:
    """The float32 then the float64 call of a function passed to grade(), in this process."""
    outcomes: dict[tuple[str, str], Outcome] = {}
    for dtype, named in inputs.items():
        try:
            outcomes[function, dtype] = as_returned(call_exercise(fn, function, named))
        except (Exception, SystemExit) as err:
            outcomes[function, dtype] = solution_error(err, learner_files)
            break
    return outcomes


# ---------------------------------------------------------------------------------------------
# one exercise


def grade_exercise(ex: Exercise, setups: dict[str, LectureSetup], outcomes: dict[tuple[str, str], Outcome]
                   ) -> ExerciseResult:
    """The rows, verdicts, notes and diagnoses of one exercise from its float32 and float64 calls."""
    result = ExerciseResult(ex.function, ex.grading_title)
    first = outcomes.get((ex.function, "float32"))
    if isinstance(first, SolutionError):
        result.error = first
        return result
    s32, s64 = setups["float32"], setups["float64"]
    grads32, storages32 = _gradients_by_name(ex, first, result.warnings)
    second = outcomes.get((ex.function, "float64"))
    grads64: dict[str, Any] = {}
    storages64: dict[str, int] = {}
    if isinstance(second, Returned):
        grads64, storages64 = _gradients_by_name(ex, second, [])
    elif isinstance(second, SolutionError):
        result.notes.append(f"in float64, {ex.function} {second}; judged in float32 only, which cannot see "
                            f"errors below {rounding_bound(torch.float32, 1):.1g} of a gradient")

    float32_only = []
    for name in ex.names:
        mine64 = grads64.get(name)
        if not (isinstance(mine64, Tensor) and mine64.dtype == torch.float64):
            if isinstance(mine64, Tensor):
                float32_only.append(name)
            mine64 = None
        row = grade_row(name, grads32.get(name), mine64, s32, s64 if mine64 is not None else None)
        result.rows.append(row)
        if row.status == "warning":
            result.warnings.append(diagnoses.shape_warning(name, row.shape, row.expected_shape))
        note = diagnoses.verdict_note(row, s32)
        if note:
            result.notes.append(note)
    if float32_only:
        result.notes.append(
            f"{', '.join('d' + n for n in float32_only)} stayed float32 when the inputs were float64: made with a "
            "fixed dtype (torch.zeros((n, 27)) where torch.zeros_like(logprobs) follows its tensor); judged in "
            f"float32 only, which cannot see errors below {rounding_bound(torch.float32, 1):.1g} of a gradient"
        )

    wrong = [r.name for r in result.rows if r.status == "wrong"]
    if wrong:
        first_wrong = result.first_divergence = wrong[0]
        precise = isinstance(grads64.get(first_wrong), Tensor) and grads64[first_wrong].dtype == torch.float64
        grads, storages, s = (grads64, storages64, s64) if precise else (grads32, storages32, s32)
        result.diagnoses = diagnoses.diagnose(first_wrong, grads, storages, s)
        if len(wrong) > 1:
            result.diagnoses.append(
                f"{len(wrong) - 1} later row{'s are' if len(wrong) > 2 else ' is'} wrong too; "
                f"they may only inherit this error: fix d{first_wrong} first"
            )
    return result


def _gradients_by_name(ex: Exercise, returned: Returned, warnings: list[str]
                       ) -> tuple[dict[str, Any], dict[str, int]]:
    """The returned gradients, and their storage ids, keyed by table names: 'dlogprobs' and
    'logprobs' both mean logprobs."""
    if ex.function != "backward":
        if returned.kind == "tensor":
            return {ex.names[0]: returned.values[""]}, {ex.names[0]: returned.storages[""]}
        return {ex.names[0]: None if returned.kind == "NoneType" else Foreign(returned.kind)}, {}
    if returned.kind != "dict":
        warnings.append(f"backward(t) returned a {returned.kind}, not a dict {{name: gradient}}")
        return {}, {}
    table = set(ex.names)
    grads: dict[str, Any] = {}
    storages: dict[str, int] = {}
    unknown = list(returned.odd_keys)
    for key, value in returned.values.items():
        name = key[1:] if key not in table and key[1:] in table and key.startswith("d") else key
        if name not in table:
            unknown.append(repr(key))
            continue
        if name in grads:
            warnings.append(f"two keys for {name} ({name!r} and 'd{name}'): graded the last one")
        grads[name] = value
        if key in returned.storages:
            storages[name] = returned.storages[key]
    if unknown:
        warnings.append(f"ignored keys that are not rows of the table: {', '.join(unknown)}")
    return grads, storages


def grade_row(name: str, mine32: Any, mine64: Tensor | None, s32: LectureSetup, s64: LectureSetup | None
              ) -> GradedRow:
    """The lecture's float32 row, and the verdict: right in float32 and, where given, in float64."""
    reference = s32.reference[name]
    expected = tuple(reference.shape)
    if mine32 is None:
        return GradedRow(name, "missing", None, None, expected)
    if not isinstance(mine32, Tensor):
        return GradedRow(name, "wrong", Row(name, False, False, float("nan")), None, expected,
                         f"is a {mine32.type_name}, not a tensor")
    row = compare(name, mine32, reference)
    verdict = judge(mine32, reference, network.gradient_scale(name, s32.reference))
    if verdict.right and s64 is not None:
        verdict64 = judge(mine64, s64.reference[name], network.gradient_scale(name, s64.reference))
        if not verdict64.right:
            verdict = verdict64._replace(reason=f"in float64 {verdict64.reason}")
    status = "wrong" if not verdict.right else ("warning" if verdict.reshaped else "right")
    return GradedRow(name, status, row, tuple(mine32.shape), expected, verdict.reason)
