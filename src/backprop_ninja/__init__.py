"""backprop-ninja: character-level language models whose every gradient is written by hand.

    import backprop_ninja
    backprop_ninja.grade(backward=my_backward)   # grade your own backward pass from a notebook
    backprop_ninja.check_backward(MyOp.apply, x, w)   # check your own op's backward pass
"""

__version__ = "0.1.0"


def grade(*args, **kwargs):
    """Grade a learner's backward pass; see `backprop_ninja.grading.grade.grade`."""
    from backprop_ninja.grading.grade import grade as _grade

    return _grade(*args, **kwargs)


def cmp(s, dt, t):
    """The lecture's cmp(s, dt, t), judged by the package's verdict; see `backprop_ninja.grading.notebook_cmp.cmp`."""
    from backprop_ninja.grading.notebook_cmp import cmp as _cmp

    return _cmp(s, dt, t)


def report():
    """The first divergence among this kernel's cmp rows so far; see `backprop_ninja.grading.notebook_cmp.report`."""
    from backprop_ninja.grading.notebook_cmp import report as _report

    return _report()


def grade_notebook(*args, **kwargs):
    """Run a notebook in a fresh kernel and grade it; see `backprop_ninja.grading.notebook.grade_notebook`."""
    from backprop_ninja.grading.notebook import grade_notebook as _grade_notebook

    return _grade_notebook(*args, **kwargs)


def check_backward(*args, **kwargs):
    """Check your own op's backward pass; see `backprop_ninja.checking.backward.check_backward`."""
    from backprop_ninja.checking.backward import check_backward as _check_backward

    return _check_backward(*args, **kwargs)


def assert_backward_correct(*args, **kwargs):
    """check_backward, raising AssertionError with the report; see `backprop_ninja.checking.backward`."""
    from backprop_ninja.checking.backward import assert_backward_correct as _assert_backward_correct

    return _assert_backward_correct(*args, **kwargs)
