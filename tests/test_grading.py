"""`check --solution`, `exercise` and `backprop_ninja.grade`: buggy solutions get the right diagnosis.

Every buggy solution is tests/solutions/correct.py with one line changed, the change written out in
the test, so each test states the learner's bug it is about. Most run on a small word list with a
batch of 7 and 13 hidden units (odd shapes; n = 7 keeps n, n-1, 1/n and 2 apart); the correct
solution is also graded on the lecture's own shapes, through the CLI.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import backprop_ninja
from backprop_ninja import cli
from backprop_ninja.grading.diagnoses import BROADCAST_RULE
from backprop_ninja.grading.grade import grade
from backprop_ninja.grading.solution import LectureTensors, load_solution
from backprop_ninja.grading.starter import TEMPLATE as STARTER_TEMPLATE

SOLUTIONS = Path(__file__).with_name("solutions")
CORRECT = SOLUTIONS / "correct.py"
TEMPLATE = Path(backprop_ninja.__file__).parent / "lecture" / "solution_template.py"
assert TEMPLATE.resolve() == STARTER_TEMPLATE.resolve()  # the file `exercise` writes
SMALL = dict(seed=1234, batch_size=7, n_hidden=13)
WORDS = (
    "emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail emily elizabeth mila ella "
    "avery sofia camila aria scarlett victoria madison luna grace chloe penelope layla riley zoey nora"
).split()


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def with_bug(tmp_path: Path, line: str, buggy: str) -> Path:
    """correct.py with one line replaced: the learner's bug."""
    source = CORRECT.read_text()
    assert source.count(line) == 1, f"{line!r} is not exactly one line of correct.py"
    path = tmp_path / "solution.py"
    path.write_text(source.replace(line, buggy))
    return path


def grade_small(words: Path, file: Path | None = None, **kwargs):
    """Grade at the small shapes. A file's functions are loaded and graded in this process: the
    diagnoses are the same, and the child process that runs files apart is tested in
    test_isolation.py (and below, through the command) without a child start per test."""
    functions = load_solution(file) if file is not None else {}
    return grade(**SMALL, input=words, verbose=False, **functions, **kwargs)


def statuses(exercise) -> dict[str, str]:
    return {r.name: r.status for r in exercise.rows}


# ---------------------------------------------------------------------------------------------
# a correct solution


def test_correct_solution_exits_0_on_the_lecture_shapes(names_path, capsys):
    assert cli.main(["check", "--solution", str(CORRECT)]) == 0  # names.txt found as the product finds it
    out = capsys.readouterr().out
    assert "(seed 2147483647, batch 32, hidden 64)" in out
    assert len(re.findall(r"\| approximate: ", out)) == 26 + 1 + 1
    assert "first divergence" not in out and "missing" not in out
    assert out.rstrip().endswith("result: every gradient is right")


def test_correct_solution_is_right_on_small_odd_shapes(words):
    result = grade_small(words, file=CORRECT)
    assert result.ok and result.exit_code == 0
    for exercise in result.exercises.values():
        assert set(statuses(exercise).values()) == {"right"}, exercise.function
        assert exercise.first_divergence is None and not exercise.warnings


def test_rows_whose_exact_gradient_is_0_are_right_despite_allclose(words):
    """At n = 7, dlogit_maxes is float32 noise (its exact value is 0): allclose's atol often fails it."""
    functions = load_solution(CORRECT)
    failed_allclose = 0
    for seed in range(6):
        result = grade(**functions, seed=seed, batch_size=7, n_hidden=13, input=words, verbose=False)
        assert result.ok, str(result)
        row = next(r for r in result.exercises["backward"].rows if r.name == "logit_maxes")
        if not row.row.approximate:  # the lecture's column, unchanged, and a note that explains it
            failed_allclose += 1
            notes = result.exercises["backward"].notes
            assert any(n.startswith("logit_maxes is right") and "exact gradient is 0" in n for n in notes)
    assert failed_allclose > 0, "no seed exercised the case"


# ---------------------------------------------------------------------------------------------
# every diagnosis: one bug each


BUGS = [
    # (learner's bug, line of correct.py, buggy line, exercise, first divergence, words of the diagnosis)
    ("bessel", "dbndiff2 = (1.0 / (n - 1)) *", "dbndiff2 = (1.0 / n) *", "backward", "bndiff2", "(n-1)/n"),
    ("no 1/n", "= -1.0 / n", "= -1.0", "backward", "logprobs", "missing 1/n"),
    ("no 1/n", "dlogits /= n", "dlogits /= 1", "cross_entropy_backward", "logits", "missing 1/n"),
    ("sign", "dbnvar = (-0.5 *", "dbnvar = (0.5 *", "backward", "bnvar", "sign flipped"),
    ("transpose", "dW2 = t.h.T @ dlogits", "dW2 = dlogits.T @ t.h", "backward", "W2", "transpose"),
    ("shape", "db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)", "backward", "b2", BROADCAST_RULE),
    ("no sum", "dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact", "backward", "bnbias",
     ".sum(0, keepdim=True)"),
    ("no clone", "dhprebn = dbndiff.clone()", "dhprebn = dbndiff", "backward", "bndiff",
     "missing .clone() before +="),
    ("no branch", "dcounts += torch.ones_like(t.counts) * dcounts_sum", "pass", "backward", "counts",
     "add the gradient through `counts_sum = counts.sum(1, keepdim=True)`"),
    ("no branch", "dbndiff += (2 * t.bndiff) * dbndiff2", "pass", "backward", "bndiff",
     "add the gradient through `bndiff2 = bndiff**2`"),
    ("assign", "dC[Xb[k, j]] += demb[k, j]", "dC[Xb[k, j]] = demb[k, j]", "backward", "C",
     "looked up more than once"),
    ("zeros", "dW1 = t.embcat.T @ dhprebn", "dW1 = torch.zeros_like(W1)", "backward", "W1", "all zeros"),
]  # fmt: skip


@pytest.mark.parametrize("bug, line, buggy, function, first, diagnosis", BUGS, ids=[f"{b[0]}-{b[4]}" for b in BUGS])
def test_bug_is_named_at_its_first_divergence_with_its_diagnosis(tmp_path, words, bug, line, buggy, function,
                                                                 first, diagnosis):  # fmt: skip
    result = grade_small(words, file=with_bug(tmp_path, line, buggy))
    assert result.exit_code == 1
    ex = result.exercises[function]
    assert ex.first_divergence == first
    assert statuses(ex)[first] == "wrong"
    assert diagnosis in ex.diagnoses[0], ex.diagnoses
    order = [r.name for r in ex.rows]
    assert all(statuses(ex)[name] == "right" for name in order[: order.index(first)])
    assert all(other.ok for name, other in result.exercises.items() if name != function)
    assert f"first divergence: {first}\n  {ex.diagnoses[0]}" in str(result)


def test_wrong_shape_gives_both_shapes(tmp_path, words):
    result = grade_small(words, file=with_bug(tmp_path, "db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)"))
    vocab = len(set("".join(WORDS))) + 1
    assert f"db2 has shape (7,) but b2 has shape ({vocab},)" in result.exercises["backward"].diagnoses[0]


def test_downstream_rows_are_listed_but_only_the_first_is_diagnosed(tmp_path, words):
    result = grade_small(words, file=with_bug(tmp_path, "dbnvar = (-0.5 *", "dbnvar = (0.5 *"))
    ex = result.exercises["backward"]
    later = ex.wrong[1:]
    assert later and all(r in ("bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "emb", "C") for r in later)
    assert ex.diagnoses[-1].startswith(f"{len(later)} later rows are wrong too")


def test_a_view_that_shares_memory_legitimately_is_not_blamed(tmp_path, words):
    """demb = dembcat.view(...) shares dembcat's memory; a wrong dembcat must not read as a missing clone."""
    result = grade_small(words, file=with_bug(tmp_path, "dembcat = dhprebn @ W1.T", "dembcat = 2 * (dhprebn @ W1.T)"))
    ex = result.exercises["backward"]
    assert ex.first_divergence == "embcat"
    assert "twice the right value" in ex.diagnoses[0]
    assert not any("clone" in d for d in ex.diagnoses)


@pytest.mark.parametrize(
    "line, buggy, name, advice",
    [
        ("dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)", "bnmeani", "keepdim=True"),
        ("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0, keepdim=True)", "b2", "sum without keepdim=True"),
    ],
    ids=["keepdim", "extra-dim"],
)  # fmt: skip
def test_shape_that_broadcasts_to_the_right_values_is_a_warning_not_a_failure(tmp_path, words, line, buggy, name,
                                                                              advice):  # fmt: skip
    result = grade_small(words, file=with_bug(tmp_path, line, buggy))
    ex = result.exercises["backward"]
    assert result.ok and result.exit_code == 0
    assert statuses(ex)[name] == "warning"
    assert len(ex.warnings) == 1 and ex.warnings[0].startswith(f"d{name} has shape") and advice in ex.warnings[0]
    assert f"warning: {ex.warnings[0]}" in str(result)


def test_a_gradient_with_fewer_entries_than_its_tensor_is_wrong_even_where_it_broadcasts(tmp_path, words):
    """dbndiff2 of shape (1, H) for the (n, H) bndiff2 holds the right numbers once broadcast, but it
    is not a gradient of bndiff2: the verdict wants the tensor's number of entries (a warning under
    the old allclose-based grader, wrong since the verdict of checking.verdict.judge)."""
    line = "dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(t.bndiff2) * dbnvar"
    result = grade_small(words, file=with_bug(tmp_path, line, "dbndiff2 = (1.0 / (n - 1)) * dbnvar"))
    ex = result.exercises["backward"]
    assert result.exit_code == 1 and not ex.warnings
    assert ex.first_divergence == "bndiff2" and ex.wrong == ["bndiff2"]  # the rows below use it broadcast: right
    row = next(r for r in ex.rows if r.name == "bndiff2")
    assert (row.shape, row.expected_shape) == ((1, 13), (7, 13))
    assert row.row.approximate  # the lecture's column broadcasts, and cannot tell
    assert row.reason == "has 13 entries; the tensor has 91 (shape (7, 13))"
    assert ex.diagnoses[0].startswith("dbndiff2 has shape (1, 13) but bndiff2 has shape (7, 13): it would "
                                      "broadcast to (7, 13), but a gradient has one entry per entry of its "
                                      "tensor: expand it, e.g. * torch.ones_like(t.bndiff2)")
    assert any(n.startswith("bndiff2 is wrong though approximate says True") for n in ex.notes)


def test_missing_gradients_are_listed_and_fail(tmp_path, words):
    result = grade_small(words, file=with_bug(tmp_path, "dW1 = t.embcat.T @ dhprebn", "dW1 = None"))
    ex = result.exercises["backward"]
    assert ex.missing == ["W1"] and ex.first_divergence is None and not ex.wrong
    assert result.exit_code == 1
    report = str(result)
    assert re.search(r"^W1 +\| missing$", report, re.M) and "missing: 1 of 26 (W1)" in report


def test_exception_is_located_in_the_learners_file_and_the_other_exercises_are_graded(tmp_path, words, capsys):
    path = with_bug(tmp_path, "    n = t.n\n    return", "    n = t.n / 0\n    return")
    line = 1 + path.read_text().splitlines().index("    n = t.n / 0")
    code = cli.main(["check", "--solution", str(path), "--input", str(words), "--batch-size", "7", "--hidden", "13"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"batchnorm_backward raised ZeroDivisionError: division by zero\n  at {path}:{line}: n = t.n / 0" in out \
        or f"at {os.path.relpath(path)}:{line}: n = t.n / 0" in out
    result = grade_small(words, file=path)
    assert result.exercises["batchnorm_backward"].error.type == "ZeroDivisionError"
    assert result.exercises["backward"].ok and result.exercises["cross_entropy_backward"].ok


def test_solution_that_writes_into_its_inputs_cannot_corrupt_the_reference(words):
    right = load_solution(CORRECT)

    def vandal_backward(t):
        grads = right["backward"](t)
        for name in t:
            if isinstance(t[name], torch.Tensor) and t[name].is_floating_point():
                t[name].fill_(float("nan"))
        return grads

    def vandal_cross_entropy_backward(logits, Yb):
        dlogits = right["cross_entropy_backward"](logits, Yb)
        logits.zero_()
        Yb.zero_()
        return dlogits

    for _ in range(2):  # and the second grading of the same setup is just as right
        result = grade_small(words, backward=vandal_backward, cross_entropy_backward=vandal_cross_entropy_backward,
                             batchnorm_backward=right["batchnorm_backward"])  # fmt: skip
        assert result.ok, str(result)


def test_d_prefixed_keys_are_accepted(words):
    right = load_solution(CORRECT)["backward"]
    result = grade_small(words, backward=lambda t: {f"d{k}": v for k, v in right(t).items()})
    assert result.ok and not result.exercises["backward"].warnings


def test_unknown_keys_and_a_non_dict_are_reported(words):
    result = grade_small(words, backward=lambda t: {"dlogprobs": None, "dWout": torch.zeros(1)})
    ex = result.exercises["backward"]
    assert len(ex.missing) == 26 and any("'dWout'" in w for w in ex.warnings)
    result = grade_small(words, backward=lambda t: [1, 2])
    assert result.exercises["backward"].warnings == ["backward(t) returned a list, not a dict {name: gradient}"]
    assert result.exit_code == 1


# ---------------------------------------------------------------------------------------------
# files that cannot be graded: one line, exit 2


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "nope.py", r"nope\.py: no such file"),
        (lambda d: d, r": is a directory"),
        (lambda d: _write(d, "bad.py", "def backward(t)\n    return {}\n"), r"bad\.py:1: not valid Python"),
        (lambda d: _write(d, "binary.py", b"\x7fELF\x00\x01\x02"), r"binary\.py: not valid Python"),
        (lambda d: _write(d, "empty.py", "x = 1\n"), r"empty\.py: defines none of backward, cross_entropy_backward"),
        (lambda d: _write(d, "boom.py", "import torch\nraise ValueError('boom')\n"),
         r"boom\.py:2: running the file raised ValueError: boom"),
        (lambda d: _write(d, "notfn.py", "backward = 3\n"), r"notfn\.py: backward is not a function"),
    ],
    ids=["missing", "directory", "syntax-error", "binary", "no-functions", "raises-on-import", "not-a-function"],
)  # fmt: skip
def test_a_file_that_cannot_be_graded_exits_2_with_one_line(tmp_path, capsys, make, expected):
    assert cli.main(["check", "--solution", str(make(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("backprop-ninja: error: ")
    assert re.search(expected, captured.err), captured.err


def test_options_that_do_not_apply_to_a_solution_exit_2(capsys):
    assert cli.main(["check", "--solution", str(CORRECT), "--numerical"]) == 2
    assert cli.main(["check", "--solution", str(CORRECT), "--batch-size", "2"]) == 2
    assert cli.main(["check", "--solution", str(CORRECT), "--model", "wavenet"]) == 2
    assert capsys.readouterr().err.count("backprop-ninja: error: ") == 3


# ---------------------------------------------------------------------------------------------
# the starter file


def test_exercise_writes_a_starter_that_grades_as_missing_without_errors(tmp_path, words, capsys):
    dest = tmp_path / "mine.py"
    assert cli.main(["exercise", str(dest)]) == 0
    assert f"backprop-ninja check --solution {dest}" in capsys.readouterr().out
    assert dest.read_text() == TEMPLATE.read_text()
    result = grade_small(words, file=dest)
    assert list(result.exercises) == ["backward", "cross_entropy_backward", "batchnorm_backward"]
    for ex in result.exercises.values():
        assert ex.error is None and not ex.wrong and ex.missing == [r.name for r in ex.rows]
    assert result.exit_code == 1
    assert "missing: all 26; start with dlogprobs" in str(result)


def test_exercise_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "mine.py"
    dest.write_text("my work\n")
    assert cli.main(["exercise", str(dest)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert dest.read_text() == "my work\n"
    assert cli.main(["exercise", str(dest), "--force"]) == 0
    assert dest.read_text() == TEMPLATE.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.py"]  # no temporary file left behind


def test_template_documents_every_attribute_of_t(words):
    text = TEMPLATE.read_text()
    seen = {}
    grade_small(words, backward=lambda t: seen.update(names=list(t)) or {})
    for name in seen["names"]:
        assert re.search(rf"\b{name}\b", text), name


# ---------------------------------------------------------------------------------------------
# from Python


def test_grade_returns_an_inspectable_result_and_prints_the_report(tmp_path, words, capsys):
    right = load_solution(CORRECT)
    result = backprop_ninja.grade(backward=right["backward"], **SMALL, input=words)
    printed = capsys.readouterr().out
    assert printed.strip() == str(result).strip()
    assert printed.startswith("grading your functions against autograd (seed 1234, batch 7, hidden 13)")
    assert list(result.exercises) == ["backward"] and result.ok
    assert repr(result) == "<GradeResult ok=True: backward: right>"
    assert result._repr_html_().startswith("<pre>")

    result = grade_small(words, file=with_bug(tmp_path, "dbnvar = (-0.5 *", "dbnvar = (0.5 *"))
    ex = result.exercises["backward"]
    assert (ex.first_divergence, ex.verdict, result.ok) == ("bnvar", "wrong from bnvar", False)
    assert ex.rows[0].row.exact and ex.rows[0].row.maxdiff == 0.0


def test_grade_locates_an_exception_in_a_function_passed_from_python(words):
    def backward(t):
        return {"logprobs": t.dlogprobs}  # t has no gradients

    ex = grade_small(words, backward=backward).exercises["backward"]
    assert ex.error.type == "AttributeError" and "t has no 'dlogprobs'" in ex.error.message
    here = os.path.relpath(__file__)
    here = __file__ if here.startswith("..") else here
    assert ex.error.location == f"{here}:{backward.__code__.co_firstlineno + 1}"
    assert ex.error.source == 'return {"logprobs": t.dlogprobs}  # t has no gradients'


def test_t_is_read_only_and_indexable():
    t = LectureTensors({"h": torch.ones(2, 3), "n": 2})
    assert t.h is t["h"] and t.n == 2 and "h" in t and dir(t) == ["h", "n"]
    with pytest.raises(AttributeError, match="read-only"):
        t.h = torch.zeros(2, 3)
    with pytest.raises(AttributeError, match="t has no 'dh'"):
        t.dh


def test_the_documented_learner_gets_one_verdict_per_exercise(words):
    """tests/solutions/learner.py is the session of docs/grading.md: three bugs, three exercises."""
    path = SOLUTIONS / "learner.py"
    result = grade_small(words, file=path)
    ex1, ex2, ex3 = result.exercises.values()
    assert ex1.first_divergence == "bndiff2" and "(n-1)/n" in ex1.diagnoses[0]
    assert len(ex1.warnings) == 1
    assert ex1.warnings[0].startswith("dbnmeani has shape (13,) but bnmeani has shape (1, 13)")
    assert ex2.first_divergence == "logits" and "missing 1/n" in ex2.diagnoses[0]
    line = 1 + next(i for i, text in enumerate(path.read_text().splitlines()) if "(dhpreact * bnraw).sum(1)" in text)
    assert ex3.error.type == "RuntimeError" and ex3.error.location.endswith(f"learner.py:{line}")
    assert result.exit_code == 1
