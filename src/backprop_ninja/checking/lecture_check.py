"""`backprop-ninja check`: prove every hand-written gradient of the lecture network right.

The lecture's fixture (lecture.fixture) is built twice, in float32 as the lecture runs it and in
float64, and our own answers to Exercises 1-3 are compared with autograd in both. The float32
rows are the lecture's table; the verdict of each row needs both runs within rounding
(checking.verdict): float32 shows what the lecture sees, float64 sees slips far below float32's
rounding, such as n/(n-1) at a large batch.

`--numerical` compares the float64 answers with central finite differences instead of autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.checking.finite_differences import (
    NumericalRow, central_differences, chunk_for, directional_difference, numerical_row, sampled_entries,
)
from backprop_ninja.checking.verdict import Judgement, Row, compare, judge
from backprop_ninja.lecture import network
from backprop_ninja.lecture.exercises import EXERCISES, our_answers
from backprop_ninja.lecture.fixture import LectureSetup


def lecture_scale(name: str, s: LectureSetup) -> float:
    """The size of the terms row `name`'s rounding comes from (network.gradient_scale)."""
    return network.gradient_scale(name, s.reference)


def judge_row(name: str, mine32: Tensor, s32: LectureSetup, mine64: Tensor | None, s64: LectureSetup | None
              ) -> Judgement:
    """The verdict of one row: float32 within float32 rounding and, where given, float64 within float64's."""
    verdict = judge(mine32, s32.reference[name], lecture_scale(name, s32))
    if verdict.right and s64 is not None:
        verdict64 = judge(mine64, s64.reference[name], lecture_scale(name, s64))
        if not verdict64.right:
            return verdict64._replace(reason=f"in float64 {verdict64.reason}")
    return verdict


class CheckedRow(NamedTuple):
    row: Row  # the lecture's float32 row
    verdict: Judgement


def lecture_rows(s32: LectureSetup, s64: LectureSetup | None = None) -> dict[str, list[CheckedRow]]:
    """Our answers to the three exercises, by exercise title: the lecture's row and the verdict."""
    mine32 = our_answers(s32)
    mine64 = our_answers(s64) if s64 is not None else None
    tables = {}
    for ex in EXERCISES:
        tables[ex.title] = [
            CheckedRow(
                compare(name, mine32[ex.function][name], s32.reference[name]),
                judge_row(name, mine32[ex.function][name], s32,
                          mine64[ex.function][name] if mine64 is not None else None, s64),
            )
            for name in ex.names
        ]
    return tables


@torch.no_grad()
def numerical_rows(params: dict[str, Tensor], Xb: Tensor, Yb: Tensor, seed: int = 0) -> list[NumericalRow]:
    """network.backward on a float64 copy of the network against central finite differences: every
    entry of a small tensor; sampled entries and a random direction of a large one (seeded)."""
    p64 = {k: v.detach().double().clone() for k, v in params.items()}
    t64 = network.forward(p64, Xb, Yb)
    mine = network.backward(p64, Xb, Yb, t64)
    g = torch.Generator().manual_seed(seed)
    chunk = chunk_for(Xb.shape[0])
    rows = []
    for name in network.BACKWARD_ORDER:
        if name in p64:  # a parameter: nudge it where the forward pass reads it

            def loss_of(x: Tensor, name: str = name) -> Tensor:
                return network.forward({**p64, name: x}, Xb, Yb).loss

            x = p64[name]
        else:  # an intermediate: hold it at a nudged value and recompute what lies downstream

            def loss_of(x: Tensor, name: str = name) -> Tensor:
                return network.forward(p64, Xb, Yb, given={name: x}).loss

            x = getattr(t64, name)
        picks = sampled_entries(x.numel(), Xb.shape[0], g)
        numerical = central_differences(loss_of, x, entries=picks, chunk=chunk)
        if picks is None:
            rows.append(numerical_row(name, mine[name], numerical, x.numel()))
            continue
        v = torch.randn(x.shape, generator=g, dtype=x.dtype)
        v /= v.norm()  # a random unit direction
        projection = (float((mine[name] * v).sum()), directional_difference(loss_of, x, v))
        rows.append(numerical_row(name, mine[name].reshape(-1)[picks], numerical, x.numel(), projection))
    return rows
