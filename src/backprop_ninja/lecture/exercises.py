"""The lecture's exercises: what each one computes, its rows, and our own answer to each.

    Exercise 1  backward(t) -> {name: gradient}                the 26 rows of BACKWARD_ORDER
    Exercise 2  cross_entropy_backward(logits, Yb) -> dlogits  one row: logits
    Exercise 3  batchnorm_backward(t, dhpreact) -> dhprebn     one row: hprebn
    Exercise 4  the training loop with the hand-written backward (`backprop-ninja train`)

Our answers to 2 and 3 are the very ops the models train with, so `check` proves the training path.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from backprop_ninja.lecture import network
from backprop_ninja.lecture.fixture import LectureSetup


class Exercise(NamedTuple):
    function: str  # what a solution file defines
    title: str  # heading of its table in `check`
    grading_title: str  # heading of its table in the grader's report
    names: tuple[str, ...]  # its rows, in backward order


EXERCISES = (
    Exercise("backward", "Exercise 1: backprop through every intermediate, one by one",
             "Exercise 1: backward(t), every intermediate one by one", network.BACKWARD_ORDER),
    Exercise("cross_entropy_backward", "Exercise 2: cross-entropy backward in one go",
             "Exercise 2: cross_entropy_backward(logits, Yb) -> dlogits", ("logits",)),
    Exercise("batchnorm_backward", "Exercise 3: batchnorm backward in one go",
             "Exercise 3: batchnorm_backward(t, dhpreact) -> dhprebn", ("hprebn",)),
)  # fmt: skip
FUNCTION_NAMES = tuple(ex.function for ex in EXERCISES)


def our_answers(s: LectureSetup) -> dict[str, dict[str, Tensor]]:
    """The package's own hand-written gradients for each exercise, keyed by function then row."""
    return {
        "backward": network.backward(s.params, s.Xb, s.Yb, s.t),
        "cross_entropy_backward": {"logits": network.cross_entropy_backward(s.t.logits, s.Yb)},
        "batchnorm_backward": {"hprebn": network.batchnorm_backward(s.params, s.t, s.reference["hpreact"])},
    }
