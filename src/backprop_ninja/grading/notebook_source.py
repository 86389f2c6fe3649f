"""Reading a learner's notebook before it runs: which cell is which exercise, what to change so it
runs offline in a temporary folder, which function is its cmp, and where its saved outputs came from.

Nothing here runs the learner's code; grading.notebook runs the plan this module makes.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from backprop_ninja.grading.notebook_kernel import find_training_loop

# "Exercise 2" at the start of a line: a markdown heading ("## Exercise 2: ...") or a code comment
# ("# Exercise 2: backprop through cross_entropy ..."), as the lecture's notebook marks its exercises.
MARKDOWN_MARKER = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?exercise\s+(\d+)\b", re.IGNORECASE | re.MULTILINE)
CODE_MARKER = re.compile(r"^\s*#+\s*exercise\s+(\d+)\b", re.IGNORECASE | re.MULTILINE)
# shell escapes and package installs: not run (offline), each replaced by `pass` on its own line
SHELL_LINE = re.compile(r"^(\s*)(?:!|%(?:pip|conda|mamba|sx|system|sh)\b|\w+\s*=\s*!)", re.MULTILINE)
SHELL_CELL = re.compile(r"^\s*%%(?:bash|sh|script|system|html\s+--isolated)\b")
NAMES_LITERAL = re.compile(r"""(?P<q>['"])(?P<path>[^'"\n]*names\.txt)(?P=q)""")
OFFLINE = "pass  # backprop-ninja: not run (offline)"


@dataclass
class PlannedCell:
    """One code cell as the grader runs it."""

    position: int  # 0-based index in the notebook's cells
    original: str  # the learner's source
    source: str  # what runs: shell lines replaced by `pass`, an absolute names.txt made relative
    saved_count: int | None  # the In [n] the learner's saved notebook shows
    exercise: int | None  # by the notebook's own "Exercise N" markers and order
    train: bool  # holds the Exercise 4 training loop
    tree: ast.Module | None  # the source as Python (magics translated), for locating lines

    def line(self, lineno: int | None) -> str | None:
        lines = self.original.splitlines()
        if lineno is None or not 1 <= lineno <= len(lines):
            return None
        return lines[lineno - 1].strip()


@dataclass
class Plan:
    cells: list[PlannedCell]
    n_cells: int  # all cells, markdown included
    cmp_names: list[str]
    data_paths: list[str]  # relative paths where the notebook opens the data set
    notes: list[str] = field(default_factory=list)  # what the grader changed, and why
    out_of_order: str | None = None
    markers: bool = False  # whether the notebook marks its exercises at all

    def by_position(self, position: int) -> PlannedCell | None:
        return next((c for c in self.cells if c.position == position), None)

    def last_cell_of(self, exercise: int) -> int | None:
        positions = [c.position for c in self.cells if c.exercise == exercise and not c.train]
        return positions[-1] if positions else None


def cell_name(position: int, saved_count: int | None) -> str:
    """How a report names a cell: its position (1-based, markdown cells counted) and its In [n]."""
    shown = f"In [{saved_count}]" if saved_count is not None else "In [ ]"
    return f"cell {position + 1} ({shown})"


def to_python(source: str) -> ast.Module | None:
    """The cell as IPython would run it (magics become calls, line for line), parsed; None if invalid."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError):
        return None


def plan(nb) -> Plan:
    """Read a notebook (nbformat v4 node) into the plan grading.notebook runs."""
    cells: list[PlannedCell] = []
    notes: list[str] = []
    data_paths: set[str] = set()
    any_marker = any(_markers(c) for c in nb.cells)
    current: int | None = None if any_marker else 1
    for position, cell in enumerate(nb.cells):
        markers = _markers(cell)
        exercise = markers[0] if markers else current
        if markers:
            current = markers[-1]
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        count = cell.get("execution_count")
        name = cell_name(position, count)
        source = _offline(cell.source, name, notes)
        source = _relative_data(source, name, notes, data_paths)
        tree = to_python(source)
        train = tree is not None and find_training_loop(tree.body) is not None
        if train:
            exercise = current = 4
        cells.append(PlannedCell(position, cell.source, source, count, exercise, train, tree))
    return Plan(cells, len(nb.cells), find_cmp_names(cells), sorted(data_paths or {"names.txt"}), notes,
                out_of_order(cells), any_marker)


def _markers(cell) -> list[int]:
    pattern = CODE_MARKER if cell.cell_type == "code" else MARKDOWN_MARKER
    return [int(m) for m in pattern.findall(cell.source)]


def _offline(source: str, name: str, notes: list[str]) -> str:
    if SHELL_CELL.match(source):
        notes.append(f"{name}: a shell cell ({source.split()[0]}), not run (offline)")
        return "\n".join(OFFLINE if k == 0 else "" for k, _ in enumerate(source.splitlines()))
    lines = source.splitlines()
    for k, line in enumerate(lines):
        match = SHELL_LINE.match(line)
        if match:
            notes.append(f"{name}, line {k + 1}: not run (offline): {line.strip()}")
            lines[k] = match.group(1) + OFFLINE
    return "\n".join(lines)


def _relative_data(source: str, name: str, notes: list[str], data_paths: set[str]) -> str:
    def place(match: re.Match) -> str:
        path = match.group("path")
        posix = PurePosixPath(path.replace("\\", "/"))
        if posix.is_absolute() or path.startswith("~") or re.match(r"^[A-Za-z]:", path):
            notes.append(f"{name}: reads the data set from {path}; graded with names.txt in its working folder")
            data_paths.add("names.txt")
            return f"{match.group('q')}names.txt{match.group('q')}"
        data_paths.add(str(posix))
        return match.group(0)

    return NAMES_LITERAL.sub(place, source)


def find_cmp_names(cells: list[PlannedCell]) -> list[str]:
    """The notebook's comparison functions: `cmp`, and any function of three or more parameters that
    reads a .grad and is called with a label first, as cmp('logprobs', dlogprobs, logprobs) is."""
    defined: dict[str, bool] = {}
    labelled_calls: set[str] = set()
    for cell in cells:
        if cell.tree is None:
            continue
        for node in ast.walk(cell.tree):
            if isinstance(node, ast.FunctionDef):
                params = len(node.args.posonlyargs) + len(node.args.args)
                reads_grad = any(isinstance(n, ast.Attribute) and n.attr == "grad" for n in ast.walk(node))
                defined[node.name] = node.name == "cmp" or (params >= 3 and reads_grad)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 3:
                first = node.args[0]
                if isinstance(first, (ast.JoinedStr, ast.Call)) or (
                        isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    labelled_calls.add(node.func.id)
    return sorted(name for name, ok in defined.items() if ok and (name == "cmp" or name in labelled_calls))


def out_of_order(cells: list[PlannedCell]) -> str | None:
    """Say so when the saved In [n] numbers do not grow down the notebook."""
    counted = [c for c in cells if c.saved_count is not None]
    inversions = [(a, b) for a, b in zip(counted, counted[1:]) if b.saved_count <= a.saved_count]
    if not inversions:
        return None
    shown = "; ".join(f"{cell_name(b.position, b.saved_count)} ran before {cell_name(a.position, a.saved_count)}"
                      for a, b in inversions[:3])
    more = f" and {len(inversions) - 3} more" if len(inversions) > 3 else ""
    return (f"the saved outputs come from out-of-order execution ({shown}{more}): what the notebook shows may not "
            "be what a run from the top gives; this grading ran every cell top to bottom")


def assignment_line(cell: PlannedCell, name: str) -> int | None:
    """The line of the last assignment to `name` in the cell (a `d<name> = ...` or `+=`)."""
    if cell.tree is None:
        return None
    lines = [n.lineno for n in ast.walk(cell.tree)
             if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
             and any(isinstance(t, ast.Name) and t.id == name and isinstance(t.ctx, ast.Store)
                     for target in (n.targets if isinstance(n, ast.Assign) else [n.target])
                     for t in ast.walk(target))]
    return max(lines) if lines else None


def call_line(cell: PlannedCell, function: str, label: str) -> int | None:
    """The line of the call function('label', ...) in the cell."""
    if cell.tree is None:
        return None
    for n in ast.walk(cell.tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == function and n.args
                and isinstance(n.args[0], ast.Constant) and n.args[0].value == label):
            return n.lineno
    return None
