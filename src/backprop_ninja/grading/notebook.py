"""Grade a learner's own notebook: `backprop-ninja check --notebook FILE.ipynb`, `grade_notebook()`.

The notebook's code cells run top to bottom in a fresh Jupyter kernel (nbclient + ipykernel), in a
temporary folder that holds the names data set at every relative path the notebook opens; the
learner's notebook and its folder are only read. Shell lines (!wget, %pip) are not run: grading is
offline. Plots are headless (MPLBACKEND=Agg). Each cell has a time limit and so has the whole
notebook; a cell that hangs is interrupted and reported.

Inside the kernel (grading.notebook_kernel) every call of the notebook's cmp is recorded, the
d<name> variables are read after each exercise's cells, and the Exercise 4 training loop runs a few
steps only, each step's hand-written gradients beside autograd's on the same batch. The numbers
come back as safetensors files; each row is judged here by the package's one verdict policy
(checking.verdict.judge), and the first divergence is explained by the grader's diagnoses.

Exit codes of the CLI: 0 every attempted exercise is right; 1 something is wrong, raised or timed
out (or nothing is attempted yet); 2 the file cannot be graded (UserError).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from backprop_ninja.checking.verdict import compare, gradient_scale, judge, scale_floor
from backprop_ninja.data import DATA_ENV
from backprop_ninja.errors import UserError
from backprop_ninja.grading import diagnoses
from backprop_ninja.grading.notebook_cmp import generic_diagnosis
from backprop_ninja.grading.notebook_kernel import HELPER, RECORDS_FILE, ROWS
from backprop_ninja.grading.notebook_results import (
    TITLES, CellProblem, NotebookExercise, NotebookResult, NotebookRow, Where,
)
from backprop_ninja.grading.notebook_source import Plan, PlannedCell, assignment_line, plan
from backprop_ninja.lecture.fixture import LectureSetup
from backprop_ninja.lecture.network import BACKWARD_ORDER, PARAM_NAMES, ZERO_GRADIENTS, Intermediates

DEFAULT_CELL_TIMEOUT_S = 60.0  # per cell (`check --timeout`)
DEFAULT_NOTEBOOK_TIMEOUT_S = 600.0  # the whole notebook, kernel start included
KERNEL_STARTUP_S = 60  # starting ipykernel, before any learner code runs
RESPONSIVE_S = 10  # a kernel that does not answer a trivial cell within this after an interrupt is stuck
# The Exercise 4 loop runs this many steps, not its 200,000: each one is checked against autograd.
LOOP_STEPS = 3
MIN_NBFORMAT = (5, 9)
TIMEOUT_ENAME = "BackpropNinjaCellTimeout"
KERNEL_NAME = "backprop-ninja-python"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CELL_FRAME = re.compile(r"Cell In\s*\[(\d+)\],? line (\d+)")


def grade_notebook(
    path: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    timeout: float = DEFAULT_CELL_TIMEOUT_S,
    notebook_timeout: float = DEFAULT_NOTEBOOK_TIMEOUT_S,
    exercises: Iterable[int] = (1, 2, 3, 4),
    verbose: bool = True,
) -> NotebookResult:
    """Run a notebook top to bottom in a fresh kernel and grade its gradients; print the report if verbose.

        result = backprop_ninja.grade_notebook("makemore_part4.ipynb")
        result.ok, result.exercises[1].first_divergence, result.to_json()

    data: the names data set (default: $BACKPROP_NINJA_DATA, else the package's own copy).
    timeout: seconds per cell; notebook_timeout: seconds for the whole notebook.
    """
    started = time.monotonic()
    path = Path(path)
    wanted = tuple(sorted({int(k) for k in exercises}))
    if not wanted or any(k not in TITLES for k in wanted):
        raise UserError(f"exercises must be among 1, 2, 3, 4; got {', '.join(map(str, wanted)) or 'none'}")
    nb = read_notebook(path)
    the_plan = plan(nb)
    if not the_plan.cells:
        raise UserError(f"{path}: has no code cells to run")
    data_file = resolve_data(data)
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-notebook-") as tmp:
        root = Path(tmp)
        work = root / "a" / "b" / "work"  # nested, so that '../names.txt' stays inside the folder
        out = root / "records"
        for folder in (work, out):
            folder.mkdir(parents=True)
        notes = list(the_plan.notes)
        _place_data(data_file, work, root, the_plan.data_paths, notes)
        problems = run_cells(the_plan, root, work, out, data_file, timeout, notebook_timeout)
        records = _read_records(out)
    result = grade_records(str(path), the_plan, records, problems, wanted)
    result.notes = notes
    result.seconds = time.monotonic() - started
    if verbose:
        print(result)
    return result


# ---------------------------------------------------------------------------------------------
# reading the notebook, and the data set


def _nbformat():
    try:
        import nbformat
    except ImportError:
        raise UserError("grading a notebook needs the notebook extra: pip install 'backprop-ninja[notebook]'") from None
    version = tuple(int(x) for x in re.findall(r"\d+", nbformat.__version__)[:2])
    if version < MIN_NBFORMAT:
        raise UserError(f"nbformat {nbformat.__version__} is too old to grade notebooks: pip install 'nbformat>=5.9'")
    return nbformat


def read_notebook(path: Path):
    """The notebook as nbformat v4; a UserError (one line) for anything that is not one."""
    nbformat = _nbformat()
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a notebook")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as text ({getattr(err, 'strerror', None) or err})") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not a notebook: not JSON ({err})") from None
    if not isinstance(raw, dict) or "cells" not in raw and "worksheets" not in raw:
        raise UserError(f"{path}: not a notebook: JSON without notebook cells")
    major = raw.get("nbformat")
    if not isinstance(major, int) or major < 3:
        raise UserError(f"{path}: notebook format {major} is too old to grade (nbformat 3 and 4 are read); "
                        "open and save it in a current Jupyter first")
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as err:  # nbformat's own validation and conversion errors
        raise UserError(f"{path}: not a valid notebook ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return nb


def resolve_data(data: str | os.PathLike | None) -> Path:
    """--data, else $BACKPROP_NINJA_DATA/names.txt, else the package's own resolution."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise UserError(f"{path}: no such data file (--data)")
        return path
    from backprop_ninja.data.names import resolve_names

    return resolve_names()


def _place_data(data_file: Path, work: Path, root: Path, relative: list[str], notes: list[str]) -> None:
    for rel in relative:
        target = (work / rel).resolve()
        if root.resolve() not in target.parents:
            notes.append(f"the notebook opens {rel}, outside any folder the grader can provide")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_file, target)  # a copy: a notebook that writes to it cannot change the data set


# ---------------------------------------------------------------------------------------------
# running the cells


def run_cells(the_plan: Plan, root: Path, work: Path, out: Path, data_file: Path, timeout: float,
              notebook_timeout: float) -> list[tuple[PlannedCell, CellProblem]]:
    """Every code cell in order in one fresh kernel; returns the cells that raised or timed out."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    deadline = time.monotonic() + notebook_timeout
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "backprop-ninja grader", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    replies: list[dict] = []
    # the client stores each cell it runs at its index: one slot per cell, and one for the grader's own
    slots = nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell() for _ in range(the_plan.n_cells + 1)])
    client = NotebookClient(
        slots, km=km, kernel_name=KERNEL_NAME, timeout=int(timeout), allow_errors=True,
        interrupt_on_timeout=True, error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": "", "traceback": []},
        shutdown_kernel="immediate", startup_timeout=KERNEL_STARTUP_S, record_timing=False,
        resources={"metadata": {"path": str(work)}},
        on_cell_error=lambda cell, cell_index, execute_reply: replies.append(execute_reply["content"]),
    )
    env = {**os.environ, "MPLBACKEND": "Agg", DATA_ENV: str(data_file.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    # the kernel process's own stdout/stderr (ipykernel's warnings) are not the notebook's output
    setup = client.setup_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        setup.__enter__()
    except Exception as err:
        raise UserError(f"the Jupyter kernel cannot start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        ) from None

    def hidden(code: str, limit: int = RESPONSIVE_S) -> dict | None:
        """Run the grader's own code between the learner's cells: no In [n], no history."""
        client.timeout = limit
        before = len(replies)
        client.execute_cell(nbformat.v4.new_code_cell(code), the_plan.n_cells, store_history=False)
        return replies[before] if len(replies) > before else None

    problems: list[tuple[PlannedCell, CellProblem]] = []
    try:
        failed = hidden(f"__import__('backprop_ninja.grading.notebook_kernel', fromlist=['install']).install("
                        f"get_ipython(), {str(out)!r}, {the_plan.cmp_names!r}, {LOOP_STEPS})", KERNEL_STARTUP_S)
        if failed is not None:
            raise UserError(f"the grader cannot run inside the kernel: {failed.get('ename')}: {failed.get('evalue')}")
        counts: dict[int, int] = {}  # the kernel's In [n] -> position of the cell
        snapshots = {the_plan.last_cell_of(k): k for k in ROWS}
        for pc in the_plan.cells:
            left = deadline - time.monotonic()
            if left < 1:
                problems.append((pc, CellProblem("not run", None, f"was not run, nor any cell after it: the notebook's "
                                                 f"time limit of {notebook_timeout:g} s ran out", _where(pc))))
                break
            if hidden(f"{HELPER}.before({pc.position}, {pc.exercise!r}, {pc.train})") is not None:
                problems.append((pc, _stuck(pc)))
                break
            limit = max(1, int(min(timeout, left)))
            client.timeout = limit
            cell = nbformat.v4.new_code_cell(pc.source)
            before = len(replies)
            client.execute_cell(cell, pc.position)
            if cell.get("execution_count") is not None:
                counts[cell.execution_count] = pc.position
            if len(replies) > before:
                reply = replies[before]
                problems.append((pc, _problem(reply, cell, pc, the_plan, counts, limit)))
                if reply.get("ename") == TIMEOUT_ENAME and hidden("pass") is not None:
                    problems.append((pc, _stuck(pc)))
                    break
            if hidden(f"{HELPER}.after({snapshots.get(pc.position)!r})") is not None:
                problems.append((pc, _stuck(pc)))
                break
    finally:
        setup.__exit__(None, None, None)
    return problems


def _where(pc: PlannedCell, line: int | None = None) -> Where:
    return Where(pc.position + 1, pc.saved_count, line, pc.line(line))


def _stuck(pc: PlannedCell) -> CellProblem:
    return CellProblem("timed out", None, "left the kernel unresponsive after the interrupt: the cells after it "
                       "were not run", _where(pc))


def _problem(reply: dict, cell, pc: PlannedCell, the_plan: Plan, counts: dict[int, int], limit: int) -> CellProblem:
    traceback = list(reply.get("traceback") or [])
    for output in cell.get("outputs", []):  # an interrupt's KeyboardInterrupt says where the cell was
        if output.get("output_type") == "error":
            traceback += output.get("traceback", [])
    line = _line_in(traceback, cell.get("execution_count"))
    if reply.get("ename") == TIMEOUT_ENAME:
        return CellProblem("timed out", None, f"did not finish within {limit} s (--timeout): interrupted",
                           _where(pc, line))
    message = (reply.get("evalue") or "").strip().splitlines()
    return CellProblem("raised", reply.get("ename"), message[0] if message else "", _where(pc, line))


def _line_in(traceback: list[str], count: int | None) -> int | None:
    """The line of this cell in an IPython traceback ("Cell In[12], line 3"), innermost first."""
    frames = CELL_FRAME.findall(ANSI.sub("", "\n".join(traceback)))
    own = [int(line) for n, line in frames if count is not None and int(n) == count]
    if own:
        return own[-1]
    match = re.search(r"line (\d+)", ANSI.sub("", "\n".join(traceback[-3:])))  # a SyntaxError's own line
    return int(match.group(1)) if match and not frames else None


# ---------------------------------------------------------------------------------------------
# grading the records


def _read_records(out: Path) -> list[dict]:
    from safetensors.torch import load_file

    index = out / RECORDS_FILE
    if not index.exists():
        return []
    records = []
    for line in index.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["tensors"] = load_file(str(out / record["file"])) if record.get("file") else {}
        records.append(record)
    return records


def grade_records(path: str, the_plan: Plan, records: list[dict], problems: list[tuple[PlannedCell, CellProblem]],
                  wanted: tuple[int, ...]) -> NotebookResult:
    setup = _lecture_setup(records)
    exercises: dict[int, NotebookExercise] = {}
    for number in wanted:
        cells = [c for c in the_plan.cells if c.exercise == number or (number == 1 and c.exercise is None)]
        errors = [p for c, p in problems if c in cells]
        if number == 4:
            ex = _grade_loop(the_plan, records, cells)
        else:
            ex = _grade_exercise(number, the_plan, records, cells, setup)
        ex.errors = errors
        if number == 3 and ex.wrong and 1 in exercises and any(
                r.name == "hpreact" and r.status == "wrong" for r in exercises[1].rows):
            ex.diagnoses.insert(0, "Exercise 3 starts from your dhpreact of Exercise 1, which is wrong: "
                                   "fix Exercise 1 first")
        if errors and ex.found_by == "cmp" and number in ROWS and len(ex.rows) < len(ROWS[number]):
            ex.notes.append(f"{len(ROWS[number]) - len(ex.rows)} of the {len(ROWS[number])} rows were not reached: "
                            "the cell raised before their cmp")
        exercises[number] = ex
    return NotebookResult(path, exercises, [p for _, p in problems], the_plan.out_of_order)


def _exercise_of(record: dict) -> int:
    return record.get("exercise") or 1


def _grade_exercise(number: int, the_plan: Plan, records: list[dict], cells: list[PlannedCell],
                    setup: LectureSetup | None) -> NotebookExercise:
    found = [r for r in records if r["kind"] == "cmp" and _exercise_of(r) == number]
    found_by = "cmp"
    if not found:
        found = [r for r in records if r["kind"] == "variables" and r["exercise"] == number]
        found_by = "variables"
        if not any(r.get("defined") for r in found) and not any(c.exercise == number for c in cells):
            found_by, found = "", []
    ex = NotebookExercise(number, TITLES[number], found_by if (found or cells) else "")
    if found_by == "variables" and found and not any(r.get("defined") for r in found):
        ex.rows = [NotebookRow(r["name"], r["label"], "not attempted", None) for r in found]
        return ex
    _judge_rows(ex, found, the_plan)
    if ex.wrong:
        first = ex.wrong[0]
        record = next(r for r in found if r["label"] == first.label and r.get("name") == first.name
                      or r["label"] == first.label)
        ex.first_divergence = first.name
        ex.where = _assignment(the_plan, record, cells)
        ex.diagnoses = _diagnose(first.name, record, found, setup)
        if len(ex.wrong) > 1:
            later = len(ex.wrong) - 1
            ex.diagnoses.append(f"{later} later row{'s are' if later > 1 else ' is'} wrong too; "
                                f"they may only inherit this error: fix d{first.name} first")
    return ex


def _judge_rows(ex: NotebookExercise, found: list[dict], the_plan: Plan) -> None:
    refs = {r.get("name") or r["label"]: r["tensors"]["ref"] for r in found if "ref" in r["tensors"]}
    floor = scale_floor(refs.values())
    for r in found:
        name = r.get("name") or r["label"]
        mine, ref = r["tensors"].get("mine"), r["tensors"].get("ref")
        if mine is None and r.get("mine_type") == "NoneType":
            ex.rows.append(NotebookRow(name, r["label"], "not attempted", None, step=r.get("step")))
            continue
        if ref is None:
            hint = " (call .retain_grad() on it before loss.backward())" if "grad is None" in r.get(
                "no_reference", "") else ""
            ex.rows.append(NotebookRow(name, r["label"], "unchecked", None,
                                       f"{r.get('no_reference', 'no reference')}{hint}", r.get("step")))
            continue
        if mine is None:
            reason = f"is a {r.get('mine_type', 'object')}, not a tensor"
            ex.rows.append(NotebookRow(name, r["label"], "wrong", None, reason, r.get("step")))
            continue
        scale = gradient_scale(ref, floor)
        if name in ZERO_GRADIENTS and ZERO_GRADIENTS[name][0] in refs:
            scale = max(gradient_scale(refs[ZERO_GRADIENTS[name][0]]), floor)
        verdict = judge(mine, ref, scale)
        status = "wrong" if not verdict.right else ("warning" if verdict.reshaped else "right")
        reason = verdict.reason
        if status == "warning":
            reason = diagnoses.shape_warning(name, tuple(mine.shape), tuple(ref.shape))
        ex.rows.append(NotebookRow(name, r["label"], status, compare(r["label"], mine, ref), reason, r.get("step")))


def _assignment(the_plan: Plan, record: dict, cells: list[PlannedCell]) -> Where | None:
    """Where the learner computed the first wrong gradient: the last `d<name> = ...` before the row."""
    cell = the_plan.by_position(record["cell"]) if record.get("cell") is not None else None
    names = [n for n in (record.get("grad_name"), f"d{record.get('name')}", f"d{record['label']}") if n]
    upto = [c for c in cells if cell is None or c.position <= cell.position]
    for candidate in reversed(upto):
        for name in names:
            line = assignment_line(candidate, name)
            if line is not None:
                return _where(candidate, line)
    return _where(cell) if cell is not None else None


def _lecture_setup(records: list[dict]) -> LectureSetup | None:
    """The notebook's own batch, parameters, forward pass and autograd's gradients, under the
    lecture's names, when Exercise 1 left them all: the lecture's diagnoses run on them."""
    forward = next((r["tensors"] for r in records if r["kind"] == "forward"), None)
    refs = {r["name"]: r["tensors"]["ref"] for r in records
            if r["kind"] == "variables" and r["exercise"] == 1 and "ref" in r["tensors"]}
    if forward is None or any(name not in refs for name in BACKWARD_ORDER):
        return None
    return LectureSetup({k: forward[k] for k in PARAM_NAMES}, forward["Xb"], forward["Yb"],
                        Intermediates(*(forward[k] for k in Intermediates._fields)), refs)


def _diagnose(name: str, record: dict, found: list[dict], setup: LectureSetup | None) -> list[str]:
    mine, ref = record["tensors"].get("mine"), record["tensors"].get("ref")
    if not isinstance(mine, Tensor) or ref is None:
        return []
    if setup is not None and name in BACKWARD_ORDER and setup.reference[name].shape == ref.shape:
        grads = {r.get("name"): r["tensors"]["mine"] for r in found if "mine" in r["tensors"]}
        s = setup._replace(reference={**setup.reference, name: ref})
        try:
            return diagnoses.diagnose(name, grads, {}, s)
        except Exception:  # a notebook whose tensors differ from the lecture's: the shared diagnoses below
            pass
    return generic_diagnosis(name, mine, ref, record.get("n"))


# ---------------------------------------------------------------------------------------------
# Exercise 4: the training loop


def _grade_loop(the_plan: Plan, records: list[dict], cells: list[PlannedCell]) -> NotebookExercise:
    loop = [r for r in records if r["kind"] == "loop"]
    train = next((c for c in the_plan.cells if c.train), None)
    ex = NotebookExercise(4, TITLES[4], "training loop" if train is not None else "")
    ex.notes += list(dict.fromkeys(r["note"] for r in records if r["kind"] == "loop_note"))
    if not loop:
        checks = [r for r in records if r["kind"] == "cmp" and r.get("exercise") == 4]
        if checks:
            ex.found_by = "cmp"
            _judge_rows(ex, checks, the_plan)
        return ex
    steps = sorted({r["step"] for r in loop})
    ex.steps = len(steps)
    ex.notes.append(f"the training loop ran {len(steps)} step{'s' if len(steps) > 1 else ''} here, not all of "
                    "its steps: every step's hand-written gradients are compared with autograd on the same batch")
    order = {name: k for k, name in enumerate(BACKWARD_ORDER)}
    for step in steps:
        trial = NotebookExercise(4, TITLES[4], ex.found_by)
        at_step = sorted((r for r in loop if r["step"] == step), key=lambda r: order.get(r["name"], len(order)))
        _judge_rows(trial, at_step, the_plan)
        if trial.wrong or step == steps[-1]:
            ex.rows = trial.rows
            if trial.wrong:
                first = trial.wrong[0]
                record = next(r for r in at_step if r["name"] == first.name)
                ex.first_divergence = first.name
                ex.where = _assignment(the_plan, record, [train] if train else cells)
                ex.diagnoses.append(f"d{first.name} disagrees with autograd at step {step} of the training loop "
                                    f"(i = {record.get('i')}), on that step's batch")
                stale = record.get("stale") or []
                if stale:
                    them = "it is a stale tensor" if len(stale) == 1 else "they are stale tensors"
                    ex.diagnoses.append(
                        f"the loop reads {', '.join(stale)} but never assigns {'it' if len(stale) == 1 else 'them'}: "
                        f"{them} left by an earlier cell, from another batch, not this step's; compute "
                        f"{'it' if len(stale) == 1 else 'them'} in the loop's forward pass")
                if isinstance(record["tensors"].get("mine"), Tensor):
                    ex.diagnoses += generic_diagnosis(first.name, record["tensors"]["mine"],
                                                      record["tensors"]["ref"], record.get("n"))
            break
    return ex
