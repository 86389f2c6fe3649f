"""Grading a learner's own notebook in a real Jupyter kernel: `check --notebook`, grade_notebook(),
and the in-notebook `from backprop_ninja import cmp`.

Each notebook is built with nbformat in the lecture's structure (tests/notebook_fixtures.py) and
graded once per module: a kernel start is the cost, so the tests share the results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import nbformat  # noqa: E402
import notebook_fixtures as fx  # noqa: E402

from backprop_ninja.cli import main  # noqa: E402
from backprop_ninja.grading.notebook import LOOP_STEPS, grade_notebook  # noqa: E402
from backprop_ninja.grading.notebook_results import NotebookResult  # noqa: E402

NOTEBOOKS = {
    "correct": (fx.correct, None),
    "bugs_a": (fx.bugs_a, None),
    "bugs_b": (fx.bugs_b, None),
    "bugs_c": (fx.bugs_c, None),
    "broken": (fx.broken, None),
    # saved In [n] out of order: the Exercise 1 cell (the 10th code cell) was run last
    "renamed_cmp": (fx.renamed_cmp, [1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 10, 11, 12, 13, 14, 15]),
    "without_cmp": (fx.without_cmp, None),
}
CELL_TIMEOUT_S = 8  # the broken notebook's endless loop costs this much


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def graded(folder, names_path) -> dict[str, NotebookResult]:
    results = {}
    for name, (cells, counts) in NOTEBOOKS.items():
        path = fx.write(folder / f"{name}.ipynb", cells(), counts)
        results[name] = grade_notebook(path, data=names_path, timeout=CELL_TIMEOUT_S, verbose=False)
        print(f"graded {name}.ipynb in {results[name].seconds:.1f} s, kernel start included")
    return results


def test_a_correct_notebook_is_right_in_every_exercise(graded, folder, record_property):
    result = graded["correct"]
    record_property("seconds_to_grade_one_notebook", round(result.seconds, 1))
    assert result.ok and result.exit_code == 0, str(result)
    statuses = {r.name: r.status for r in result.exercises[1].rows}
    # the lecture's own dbnmeani = (-dbndiff).sum(0) drops keepdim: right values, a warning
    assert statuses.pop("bnmeani") == "warning" and set(statuses.values()) == {"right"} and len(statuses) == 25
    assert "warning: dbnmeani has shape (16,) but bnmeani has shape (1, 16)" in str(result)
    assert result.exercises[1].found_by == "cmp"
    assert result.exercises[4].steps == LOOP_STEPS  # not 200,000
    assert result.errors == [] and result.out_of_order is None
    assert result.seconds < 60, f"grading one notebook took {result.seconds:.1f} s (goal: < 20 s)"


def test_shell_lines_are_not_run_and_the_notebook_is_left_alone(graded, folder):
    notes = "\n".join(graded["correct"].notes)
    assert "not run (offline): !wget https://raw.githubusercontent.com" in notes
    before = (folder / "correct.ipynb").read_bytes()
    assert nbformat.reads(before.decode(), as_version=4).cells[2].outputs == []  # no outputs written back
    assert not any(p.name == "names.txt" for p in folder.iterdir())  # the data went to a temporary folder


def test_a_bessel_slip_is_the_first_divergence_of_exercise_1_and_says_where(graded):
    ex = graded["bugs_a"].exercises[1]
    assert ex.first_divergence == "bndiff2"
    assert ex.where.cell == 11 and ex.where.saved_count == 10
    assert ex.where.source == "dbndiff2 = (1.0/n)*torch.ones_like(bndiff2) * dbnvar"
    assert "(n-1)/n of the right value" in ex.diagnoses[0]
    assert "later rows are wrong too" in ex.diagnoses[-1]


def test_a_missing_one_over_n_in_exercise_2(graded):
    ex = graded["bugs_a"].exercises[2]
    assert ex.first_divergence == "logits"
    assert "n = 8 times too large: a missing 1/n" in ex.diagnoses[0]


def test_an_exercise_still_none_is_not_attempted_not_wrong(graded):
    ex = graded["bugs_a"].exercises[3]
    assert ex.verdict == "not attempted" and ex.ok
    assert "not attempted (still None)" in str(graded["bugs_a"])


def test_a_stale_bnraw_in_the_training_loop_is_caught_at_its_step(graded):
    ex = graded["bugs_a"].exercises[4]
    assert ex.first_divergence == "bngain"
    # step 0 reuses Exercise 1's seed and batch, so the stale bnraw happens to be right there
    assert ex.wrong[0].step == 1 and ex.verdict == "wrong from bngain at step 1"
    assert ex.where.source == "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)"
    assert any("reads bnraw but never assigns it" in d for d in ex.diagnoses), ex.diagnoses
    assert graded["bugs_a"].exit_code == 1


def test_a_forgotten_branch_is_named_with_its_forward_line(graded):
    result = graded["bugs_b"]
    ex = result.exercises[1]
    assert ex.first_divergence == "counts"
    assert "add the gradient through `counts_sum = counts.sum(1, keepdim=True)`" in ex.diagnoses[0]
    assert result.exercises[3].diagnoses[0].startswith("Exercise 3 starts from your dhpreact of Exercise 1")


def test_a_transposed_weight_gradient(graded):
    ex = graded["bugs_c"].exercises[1]
    assert ex.first_divergence == "W2"
    assert "transpose of the right gradient" in ex.diagnoses[0]
    assert graded["bugs_c"].exercises[3].first_divergence == "hprebn"


def test_a_notebook_that_does_not_run_top_to_bottom(graded):
    result = graded["broken"]
    first = result.errors[0]
    assert (first.kind, first.type, first.message) == ("raised", "NameError", "name 'dbngain' is not defined")
    assert (first.where.cell, first.where.saved_count, first.where.source) == (
        11, 10, "cmp('bngain', dbngain, bngain)")
    text = str(result)
    assert "does not run top to bottom: cell 11 (In [10]) raised NameError: name 'dbngain' is not defined" in text
    assert "14 of the 26 rows were not reached" in text
    assert result.exit_code == 1


def test_a_cell_that_hangs_is_interrupted_and_the_rest_still_runs(graded):
    result = graded["broken"]
    hung = result.exercises[2].errors[0]
    assert hung.kind == "timed out" and f"did not finish within {CELL_TIMEOUT_S} s" in hung.message
    assert result.exercises[2].verdict == "timed out"
    assert result.exercises[3].verdict == "right"  # the cells after it ran
    assert result.seconds < CELL_TIMEOUT_S + 60


def test_a_renamed_cmp_is_captured_and_out_of_order_outputs_are_named(graded):
    result = graded["renamed_cmp"]
    assert result.exercises[1].found_by == "cmp" and result.exercises[1].first_divergence == "bndiff2"
    assert "out-of-order execution (cell 12 (In [10]) ran before cell 11 (In [30]))" in result.out_of_order
    assert "note: the saved outputs come from out-of-order execution" in str(result)


def test_without_cmp_the_d_variables_are_read_after_each_exercise(graded):
    result = graded["without_cmp"]
    assert result.exercises[1].found_by == "variables" and result.exercises[1].verdict == "right"
    # dlogits is a row of Exercise 1 (right) and of Exercise 2 (wrong): each read after its own cells
    assert result.exercises[2].first_divergence == "logits"
    assert "missing 1/n" in result.exercises[2].diagnoses[0]


def test_the_json_record_is_machine_readable(graded):
    record = json.loads(graded["bugs_a"].to_json())
    assert record["ok"] is False and record["exit_code"] == 1
    assert record["exercises"]["1"]["first_divergence"] == "bndiff2"
    assert record["exercises"]["4"]["rows"][0]["step"] == 1
    assert record["exercises"]["3"]["verdict"] == "not attempted"


# ---------------------------------------------------------------------------------------------
# files that cannot be graded: exit 2, one line, no traceback, no kernel


def _not_notebooks(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "text.ipynb").write_text("print('hello')\n")
    (tmp_path / "other.ipynb").write_text(json.dumps({"name": "not a notebook"}))
    (tmp_path / "old.ipynb").write_text(json.dumps({"nbformat": 2, "worksheets": [], "metadata": {}}))
    fx.write(tmp_path / "prose.ipynb", [("markdown", "# only words")])
    (tmp_path / "folder.ipynb").mkdir()
    return {
        "text.ipynb": "not JSON", "other.ipynb": "JSON without notebook cells", "old.ipynb": "too old",
        "prose.ipynb": "has no code cells", "folder.ipynb": "is a directory", "missing.ipynb": "no such file",
    }


def test_files_that_are_not_notebooks_exit_2_with_one_line(tmp_path, capsys, names_path):
    for name, why in _not_notebooks(tmp_path).items():
        code = main(["check", "--notebook", str(tmp_path / name), "--data", str(names_path)])
        out, err = capsys.readouterr()
        assert code == 2, (name, out, err)
        assert err.count("\n") == 1 and why in err and "Traceback" not in err, err


def test_several_notebooks_one_summary_line_each_then_a_table(tmp_path, capsys, names_path):
    _not_notebooks(tmp_path)
    attempted = fx.write(tmp_path / "starter.ipynb", [("code", fx.IMPORTS), ("code", "x = 1")])
    code = main(["check", "--notebook", str(attempted), str(tmp_path / "text.ipynb"), "--data", str(names_path)])
    out = capsys.readouterr().out.splitlines()
    assert code == 2  # the worst of the notebooks: one cannot be graded
    assert out[0].startswith(f"{attempted}: nothing attempted; Exercise 1 ")
    assert out[1].startswith(f"{tmp_path / 'text.ipynb'}: cannot be graded: not a notebook: not JSON")
    assert out[3].startswith("notebook") and "Exercise 4" in out[3]
    assert len(out) == 6


def test_json_of_a_file_that_is_not_a_notebook(tmp_path, capsys):
    (tmp_path / "text.ipynb").write_text("hello")
    assert main(["check", "--notebook", str(tmp_path / "text.ipynb"), "--json"]) == 2
    record = json.loads(capsys.readouterr().out)
    assert record["exit_code"] == 2 and "not JSON" in record["cannot_grade"]


def test_exercises_option_is_checked(tmp_path, capsys):
    assert main(["check", "--notebook", str(tmp_path / "x.ipynb"), "--exercises", "1,5"]) == 2
    assert "--exercises" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# in the learner's own kernel: from backprop_ninja import cmp, report(), grade_notebook()


def test_cmp_report_and_grade_notebook_in_a_real_kernel(tmp_path, names_path):
    from nbclient import NotebookClient

    small = fx.write(tmp_path / "small.ipynb", [("code", "x = 1")])
    cells = [
        "import torch\nimport backprop_ninja\nfrom backprop_ninja import cmp",
        "x = torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_(True)\n(x**2).sum().backward()",
        "cmp('x', 2 * x.detach(), x)\ncmp('y', 4 * x.detach(), x)\ncmp('z', None, x)",
        "print(backprop_ninja.report())",
        f"r = backprop_ninja.grade_notebook({str(small)!r}, data={str(names_path)!r}, verbose=False)\n"
        "print(r.exit_code, r.summary())",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    started = time.monotonic()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"in-kernel test: {time.monotonic() - started:.1f} s")
    out = ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells]
    rows = out[2].splitlines()
    assert rows[0] == "x               | exact: True  | approximate: True  | maxdiff: 0.0"
    assert rows[1].startswith("y               | exact: False | approximate: False | maxdiff: ")
    assert rows[2].startswith("                  wrong: dy is off by") and "twice the right value" in rows[2]
    assert rows[3] == "z               | not attempted: the gradient is still None"
    assert out[3].startswith("backprop-ninja: first divergence so far: dy is off by")
    assert "1 of 2 compared rows wrong; not attempted yet: z" in out[3]
    assert out[4].startswith(f"1 {small}: nothing attempted;")
