"""Learner code runs apart: a solution file cannot hang the grader, end it, or change its verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from backprop_ninja import grade
from backprop_ninja.cli import main
from backprop_ninja.errors import UserError

SOLUTIONS = Path(__file__).parent / "solutions"
CORRECT = (SOLUTIONS / "correct.py").read_text(encoding="utf-8")
TIMEOUT = 5.0  # seconds per call: the correct functions take milliseconds


def solution(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "solution.py"
    path.write_text(source, encoding="utf-8")
    return path


def with_body(function: str, body: str) -> str:
    """The correct solution whose `function` first runs `body` (indented code)."""
    head = f"def {function}("
    start = CORRECT.index(head)
    line_end = CORRECT.index("\n", start) + 1
    return CORRECT[:line_end] + "".join(f"    {line}\n" for line in body.splitlines()) + CORRECT[line_end:]


@pytest.mark.parametrize("body, what", [
    ("while True:\n    pass", "timed out"),
    ("import sys\nsys.exit(3)", "raised SystemExit"),
    ("import os\nos._exit(7)", "exit status 7"),
    ("import ctypes\nctypes.string_at(0)", "segmentation fault"),
    ("raise MemoryError('out of memory')", "raised MemoryError"),
])
def test_a_misbehaving_exercise_is_reported_and_the_others_still_graded(tmp_path, names_path, body, what):
    path = solution(tmp_path, with_body("cross_entropy_backward", body))
    result = grade(file=path, input=names_path, timeout=TIMEOUT, verbose=False)
    ce = result.exercises["cross_entropy_backward"]
    assert not ce.ok and what in str(ce.error)
    assert result.exercises["backward"].ok and result.exercises["batchnorm_backward"].ok
    assert result.exit_code == 1


def test_patching_torch_in_the_solution_cannot_change_the_verdict(tmp_path, names_path):
    """allclose always True, == always True, and every gradient zero: all wrong."""
    patch = (
        "import torch\n"
        "torch.allclose = lambda *a, **k: True\n"
        "torch.Tensor.__eq__ = lambda self, other: torch.ones_like(self, dtype=torch.bool)\n"
        "def backward(t):\n"
        "    names = ['logprobs', 'probs', 'counts_sum_inv', 'counts_sum', 'counts', 'norm_logits', 'logit_maxes',\n"
        "             'logits', 'h', 'W2', 'b2', 'hpreact', 'bngain', 'bnbias', 'bnraw', 'bnvar_inv', 'bnvar',\n"
        "             'bndiff2', 'bndiff', 'bnmeani', 'hprebn', 'embcat', 'W1', 'b1', 'emb', 'C']\n"
        "    return {name: torch.zeros_like(t[name]) for name in names}\n"
    )
    result = grade(file=solution(tmp_path, patch), input=names_path, timeout=TIMEOUT, verbose=False)
    assert not result.ok
    assert result.exercises["backward"].first_divergence == "logprobs"


def test_the_command_exits_1_with_one_line_per_problem(tmp_path, names_path, capsys):
    path = solution(tmp_path, with_body("batchnorm_backward", "while True:\n    pass"))
    code = main(["check", "--solution", str(path), "--input", str(names_path), "--timeout", "3"])
    out = capsys.readouterr().out
    assert code == 1
    assert "batchnorm_backward timed out: batchnorm_backward did not finish within 3 s" in out
    assert "Traceback" not in out


def test_a_file_that_hangs_while_loading_cannot_be_graded(tmp_path, names_path):
    path = solution(tmp_path, "while True:\n    pass\n" + CORRECT)
    with pytest.raises(UserError, match="running the file did not finish within 3 s"):
        grade(file=path, input=names_path, timeout=3, verbose=False)


def test_a_file_that_exits_while_loading_cannot_be_graded(tmp_path, names_path):
    path = solution(tmp_path, "import os\nos._exit(0)\n" + CORRECT)
    with pytest.raises(UserError, match="running the file ended the process with exit status 0"):
        grade(file=path, input=names_path, timeout=TIMEOUT, verbose=False)
