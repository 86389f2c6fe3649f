"""check_backward proves an engineer's own backward pass right or wrong, and says why.

The corpus (tests/backward_corpus.py) holds custom autograd Functions and cs231n pairs, correct
and buggy, one bug class each: every correct one must be right and every buggy one wrong with its
diagnosis, in float32 and float64, against a reference and (where quick) against finite
differences. Then the checks that need shapes (a bug hidden at a square shape), a module's
parameters, exceptions and time limits, and `check --function FILE:NAME` in its child process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import backward_corpus as corpus  # noqa: E402
from backward_corpus import BUGGY, CORRECT, Entry  # noqa: E402

from backprop_ninja import assert_backward_correct, check_backward  # noqa: E402
from backprop_ninja.checking.backward import Finding, GradientCheck  # noqa: E402
from backprop_ninja.cli import main  # noqa: E402

DTYPES = [torch.float32, torch.float64]
# finite differences cost two forward passes an entry: the small ops are checked that way too
QUICK = {"linear", "affine pair", "layernorm", "batchnorm", "variance", "gelu", "rnn step pair", "embedding",
         "residual", "mul-add", "tanh", "dropout", "linear: dW transposed", "linear: db over the wrong dim",
         "linear: dx sign", "linear: dW in float16", "layernorm: dw over the features", "layernorm: db a mean",
         "variance: Bessel slip", "gelu: 0.5 forgotten", "rnn step pair: one example short",
         "embedding: = where += is needed", "residual: skip branch forgotten", "mul-add: dx and dy share memory",
         "tanh: input changed in place", "dropout: mask redrawn in backward", "cross-entropy: no 1/B"}


def run(entry: Entry, dtype: torch.dtype, truth: str):
    reference = entry.reference if truth == "reference" else None
    return check_backward(entry.fn, lambda shape: entry.make(shape, dtype), shapes=entry.shapes, reference=reference)


def cases(entries, truths=("reference", "finite differences")):
    return [pytest.param(e, dtype, truth, id=f"{e.name}-{str(dtype)[6:]}-{truth[:3]}")
            for e in entries for dtype in DTYPES for truth in truths
            if truth == "reference" or e.name in QUICK]


@pytest.mark.parametrize("entry, dtype, truth", cases(CORRECT))
def test_correct_backward_is_right(entry, dtype, truth):
    report = run(entry, dtype, truth)
    assert report.ok, str(report)
    assert report.first_wrong is None
    assert len(report.cases) == len(entry.shapes) * (2 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("entry, dtype, truth", cases(BUGGY))
def test_buggy_backward_is_wrong_with_its_diagnosis(entry, dtype, truth):
    report = run(entry, dtype, truth)
    text = str(report)
    assert not report.ok, text
    words = (entry.words,) if isinstance(entry.words, str) else entry.words
    for word in words:
        assert word in text, f"{entry.name}: {word!r} not in\n{text}"
    if entry.first is not None:
        assert report.first_wrong.name == entry.first, text
    assert "result: wrong" in text


def test_every_bug_class_is_in_the_corpus():
    classes = {e.bug for e in BUGGY}
    assert classes >= {"transpose", "wrong reduction dim", "sign flip", "dtype", "constant factor 1/n",
                       "constant factor n", "constant factor (n-1)/n", "constant factor 2", "constant factor sqrt(d)",
                       "shape-dependent", "Bessel slip", "input modified in place", "wrong number of gradients",
                       "gradient for an integer input", "right only in part", "missing branch", "shared memory",
                       "nondeterminism"}


# ---------------------------------------------------------------------------------------------
# shapes


def test_a_bug_hidden_at_a_square_shape_is_caught_at_a_non_square_one():
    fn, make = corpus.LayerNormSizeOfBatch.apply, corpus.norm_inputs
    square = check_backward(fn, lambda s: make(s, torch.float64), shapes=[(4, 4)], reference=corpus.layernorm_reference)
    assert square.ok  # right where B == D: the reason to check at several shapes
    assert "every shape checked is square" in str(square)
    both = check_backward(fn, lambda s: make(s, torch.float64), shapes=[(4, 4), (3, 5)],
                          reference=corpus.layernorm_reference)
    assert not both.ok and "right at the square shape" in str(both)


def test_a_transpose_at_a_square_shape_keeps_its_shape_and_is_still_named():
    report = check_backward(corpus.LinearTransposedW.apply, lambda s: corpus.linear_inputs(s, torch.float64),
                            shapes=[(4, 4, 4)], reference=corpus.linear_reference)
    assert not report.ok
    assert report.first_wrong.name == "W"
    assert "transpose of the right gradient" in " ".join(report.first_wrong.diagnoses)


def test_a_factory_without_shapes_is_called_with_two_seeds():
    seen = []

    def make_inputs(seed):
        seen.append(seed)
        return corpus.linear_inputs((3 + seed, 5, 4), torch.float64)

    assert check_backward(corpus.Linear.apply, make_inputs, seed=0).ok
    assert seen == [0, 1]


def test_a_large_input_is_sampled_and_the_report_says_how_many():
    x, w, b = corpus.norm_inputs((512, 3), torch.float64)
    report = check_backward(corpus.BatchNorm.apply, x, w, b)
    assert report.ok, str(report)
    assert "256 of 1536 entries" in str(report)


# ---------------------------------------------------------------------------------------------
# a module, the report, exceptions and time limits


def test_a_module_with_a_custom_function_inside_gets_rows_for_its_parameters():
    x = corpus.linear_inputs((3, 5, 4), torch.float64)[0]
    report = check_backward(corpus.LinearModule(dtype=torch.float64), x)
    assert report.ok, str(report)
    assert [c.name for c in report.checks] == ["x", "W", "b"]
    wrong = check_backward(corpus.LinearModule(corpus.LinearSignW, dtype=torch.float32), x.float())
    assert not wrong.ok and wrong.first_wrong.name == "W"
    assert "sign flipped" in " ".join(wrong.first_wrong.diagnoses)


def test_the_report_reads_like_the_lecture_table_and_shows_in_a_notebook():
    x, W, b = corpus.linear_inputs((3, 5, 4), torch.float32)
    report = check_backward(corpus.LinearSign.apply, x, W, b, reference=corpus.linear_reference)
    text = str(report)
    assert "x               | exact: False | approximate: False | maxdiff: " in text
    assert "dx worst: [" in text and "expected" in text
    assert isinstance(report.first_wrong, GradientCheck) and report.first_wrong.name == "x"
    html = report._repr_html_()
    assert "<table>" in html and "sign flipped" in html


def test_assert_backward_correct_raises_with_the_report():
    x, W, b = corpus.linear_inputs((3, 5, 4), torch.float64)
    assert_backward_correct(corpus.Linear.apply, x, W, b)
    with pytest.raises(AssertionError, match="sign flipped"):
        assert_backward_correct(corpus.LinearSign.apply, x, W, b)


class Raises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dout):
        return dout @ torch.ones(7, 7)  # a shape mistake


class Sleeps(corpus.Tanh):
    @staticmethod
    def backward(ctx, dout):
        time.sleep(5)
        return dout


def test_an_exception_in_the_backward_is_a_finding_at_the_users_line():
    report = check_backward(Raises.apply, torch.randn(3, 5, dtype=torch.float64))
    assert not report.ok
    finding = report.first_wrong
    assert isinstance(finding, Finding)
    assert "fn raised RuntimeError" in finding.message and "test_check_backward.py:" in finding.message
    assert "dout @ torch.ones(7, 7)" in finding.message


def test_a_backward_that_hangs_is_stopped_by_the_time_limit():
    start = time.monotonic()
    report = check_backward(Sleeps.apply, torch.randn(3, 5, dtype=torch.float64), timeout=0.5)
    assert time.monotonic() - start < 4
    assert not report.ok and "did not finish within 0.5 s" in str(report)


# ---------------------------------------------------------------------------------------------
# check --function FILE:NAME, in a child process

OP_FILE = '''
import time
import torch

SHAPES = [(3, 5), (4, 4)]


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        return dout * w, (dout * x).sum(0)


class Wrong(Scale):
    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        return dout * w, (dout * x).mean(0)


def Broken_forward(x, w):
    return x * w, (x, w)


def Broken_backward(dout, cache):
    x, w = cache
    return dout * w, (dout * x).sum(2)


class Hangs(Scale):
    @staticmethod
    def backward(ctx, dout):
        while True:
            time.sleep(0.1)


def make_inputs(shape):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g), torch.randn(shape[1], generator=g)
'''


@pytest.fixture
def op_file(tmp_path):
    path = tmp_path / "my_op.py"
    path.write_text(OP_FILE)
    return path


def test_check_function_exits_0_right_and_1_wrong_with_the_rows(op_file, capsys):
    assert main(["check", "--function", f"{op_file}:Scale"]) == 0
    assert "result: right" in capsys.readouterr().out
    assert main(["check", "--function", f"{op_file}:Wrong"]) == 1
    out = capsys.readouterr().out
    assert "w               | exact: False | approximate: False" in out and "times too small: a 1/n too many" in out


def test_check_function_reports_an_exception_at_the_files_line_and_stops_a_hang(op_file, capsys):
    assert main(["check", "--function", f"{op_file}:Broken", "--timeout", "20"]) == 1
    out = capsys.readouterr().out
    line = OP_FILE.splitlines().index("    return dout * w, (dout * x).sum(2)") + 1
    assert "fn raised IndexError" in out and f"my_op.py:{line} (return dout * w, (dout * x).sum(2))" in out
    assert main(["check", "--function", f"{op_file}:Hangs", "--timeout", "2"]) == 1
    assert "did not finish within 2 s" in capsys.readouterr().out


def test_check_function_refuses_what_it_cannot_check_in_one_line(op_file, tmp_path, capsys):
    assert main(["check", "--function", f"{tmp_path}/missing.py:Scale"]) == 2
    assert main(["check", "--function", f"{op_file}"]) == 2
    bad = tmp_path / "lists.py"
    bad.write_text(OP_FILE.replace("return torch.randn(*shape, generator=g), torch.randn(shape[1], generator=g)",
                                   "return [[1.0, 2.0]], torch.randn(shape[1], generator=g)"))
    assert main(["check", "--function", f"{bad}:Scale"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("backprop-ninja: error: ") for line in err)
    assert "no such file" in err[0] and "expected FILE.py:NAME" in err[1]
    assert "returned a list as input 0: every input must be a torch tensor" in err[2]
