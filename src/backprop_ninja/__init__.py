"""backprop-ninja: character-level language models whose every gradient is written by hand.

    import backprop_ninja
    backprop_ninja.grade(backward=my_backward)   # grade your own backward pass from a notebook
"""

__version__ = "0.1.0"


def grade(*args, **kwargs):
    """Grade a learner's backward pass; see `backprop_ninja.grading.grade.grade`."""
    from backprop_ninja.grading.grade import grade as _grade

    return _grade(*args, **kwargs)
