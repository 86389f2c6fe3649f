"""The one verdict policy: it cannot pass a wrong gradient, at any batch a user will try.

Every buggy solution here is the correct one (tests/solutions/correct.py) with one line changed;
each must be wrong, with the right first divergence and diagnosis, and the correct one right, at
batch sizes 3, 4, 7, 32, 1000 and 5000 and hidden widths 13, 64 and 200. The functions are graded
in this process (grade(backward=...)); the child process that runs solution *files* is tested in
test_isolation.py.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from backprop_ninja import grade
from backprop_ninja.checking.verdict import Row, compare, judge, rounding_bound

CORRECT = (Path(__file__).parent / "solutions" / "correct.py").read_text(encoding="utf-8")
# the correct solution's embedding loop, vectorised so that batch 5000 grades in a second
LOOP = """    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            dC[Xb[k, j]] += demb[k, j]
"""
FAST = CORRECT.replace(LOOP, "    dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))\n")
assert FAST != CORRECT

# name -> (the line as written, the line with the bug, first divergence, words of the diagnosis: a string or
# strings that must all be in one line)
BUGS = {
    "bessel": ("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / n)", "bndiff2", "(n-1)/n of the right value"),
    "branch-factor": ("dbndiff += (2 * t.bndiff) * dbndiff2", "dbndiff += t.bndiff * dbndiff2", "bndiff",
                      ("the term through `bndiff2 = bndiff**2` is", "half the right value")),
    "twice": ("dembcat = dhprebn @ W1.T", "dembcat = 2 * (dhprebn @ W1.T)", "embcat", "twice the right value"),
    "empty": ("dbngain = (t.bnraw * dhpreact).sum(0, keepdim=True)",
              "dbngain = torch.empty(0, t.bngain.shape[1])", "bngain", "is empty"),
    "sign": ("dW2 = t.h.T @ dlogits", "dW2 = -(t.h.T @ dlogits)", "W2", "sign flipped"),
    "transpose": ("dW2 = t.h.T @ dlogits", "dW2 = dlogits.T @ t.h", "W2", "transpose"),
    "mean": ("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0", "logprobs",
             "times too large: a missing 1/n"),
    "clone": ("dhprebn = dbndiff.clone()", "dhprebn = dbndiff", "bndiff", "shares its memory with dhprebn"),
    "branch": ("dcounts += torch.ones_like(t.counts) * dcounts_sum", "pass", "counts",
               "holds only the gradient through `probs = counts * counts_sum_inv`"),
    "nan": ("dprobs = (1.0 / t.probs) * dlogprobs", "dprobs = (1.0 / t.probs) * dlogprobs / 0", "probs",
            "nan or inf"),
}
BATCHES = [3, 4, 7, 32, 1000, 5000]
HIDDEN = [13, 64, 200]


def backward_of(source: str):
    module = types.ModuleType("solution_under_test")
    exec(compile(source, "solution_under_test.py", "exec"), module.__dict__)
    return module.backward


def buggy(bug: str):
    right, wrong, _, _ = BUGS[bug]
    assert right in FAST
    return backward_of(FAST.replace(right, wrong, 1))


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("batch", BATCHES)
def test_the_correct_solution_is_right_at_every_size(names_path, batch, hidden):
    result = grade(backward=backward_of(FAST), batch_size=batch, n_hidden=hidden, input=names_path, verbose=False)
    assert result.ok, str(result)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_every_buggy_solution_is_wrong_with_its_diagnosis(names_path, bug, batch, hidden):
    _, _, first, words = BUGS[bug]
    result = grade(backward=buggy(bug), batch_size=batch, n_hidden=hidden, input=names_path, verbose=False)
    ex = result.exercises["backward"]
    assert not result.ok and result.exit_code == 1
    assert ex.first_divergence == first, str(result)
    words = (words,) if isinstance(words, str) else words
    assert any(all(w in line for w in words) for line in ex.diagnoses), str(result)


def test_factors_that_coincide_at_this_batch_are_all_named(names_path):
    """At n = 3, a factor 2 is also n-1: both are named, with the advice to change the batch."""
    result = grade(backward=buggy("twice"), batch_size=3, n_hidden=13, input=names_path, verbose=False)
    diagnosis = result.exercises["backward"].diagnoses[0]
    assert "twice the right value" in diagnosis and "n-1 = 2 times too large" in diagnosis
    assert "another size" in diagnosis


def test_a_bessel_slip_the_lecture_table_calls_approximate_gets_a_note(names_path):
    """At batch 1000 allclose's 1e-8 passes 1/n for 1/(n-1): the row reads True, the verdict wrong."""
    result = grade(backward=buggy("bessel"), batch_size=1000, n_hidden=64, input=names_path, verbose=False)
    ex = result.exercises["backward"]
    row = next(r for r in ex.rows if r.name == "bndiff2")
    assert row.status == "wrong"
    if row.row.approximate:
        assert any(note.startswith("bndiff2 is wrong though approximate says True") for note in ex.notes)


def test_a_fixed_dtype_is_judged_in_float32_with_a_note(names_path):
    """torch.zeros((27, 10)) for dC stays float32 in the float64 run: right in float32, and said so."""
    source = CORRECT.replace("dC = torch.zeros_like(C)", "dC = torch.zeros((C.shape[0], C.shape[1]))")
    result = grade(backward=backward_of(source), input=names_path, verbose=False)
    assert result.ok
    assert any("dC stayed float32" in note for note in result.exercises["backward"].notes)


# ---------------------------------------------------------------------------------------------
# judge() itself


def test_judge_refuses_what_allclose_passes():
    ref = torch.randn(1, 5)
    assert torch.allclose(torch.empty(0, 5), ref)  # the hole: an empty broadcast compares True
    assert not judge(torch.empty(0, 5), ref).right
    assert "empty" in judge(torch.empty(0, 5), ref).reason
    assert not judge(ref.double(), ref).right and "float64" in judge(ref.double(), ref).reason
    assert not judge(torch.full((1, 5), math.nan), ref).right
    assert not judge(ref.expand(3, 5), ref).right  # 15 entries for 5
    assert not judge([1.0] * 5, ref).right


def test_judge_allows_size_one_dimensions_as_a_warning():
    ref = torch.randn(1, 5)
    verdict = judge(ref.reshape(5), ref)
    assert verdict.right and verdict.reshaped


def test_judge_bound_follows_the_dtype():
    ref = torch.ones(10, dtype=torch.float64)
    bound = rounding_bound(torch.float64, 1.0)
    assert judge(ref + 0.5 * bound, ref).right
    assert not judge(ref + 2 * bound, ref).right
    assert rounding_bound(torch.float32, 1.0) > 1e6 * bound


def test_the_lecture_row_of_an_empty_tensor_is_not_true():
    row = compare("bngain", torch.empty(0, 5), torch.randn(1, 5))
    assert row == Row("bngain", False, False, row.maxdiff) and math.isnan(row.maxdiff)
