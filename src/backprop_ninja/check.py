"""`backprop-ninja check`: prove every hand-written gradient of the lecture network right.

Builds the lecture MLP and one batch exactly as the lecture does (one generator, seeded, draws the
parameters and then the batch), runs the chunked forward pass with autograd as the reference, and
prints the lecture's comparison table for Exercises 1, 2 and 3. The exit status is 0 when every row
is right: approximate, or off by no more than float32 rounding (`compare.within_rounding`).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja import lecture
from backprop_ninja.compare import Row, compare, compare_all, format_row, within_rounding
from backprop_ninja.data import load_dataset
from backprop_ninja.models import ModelConfig, build_model

LECTURE_HIDDEN = 64  # the lecture checks its gradients on a 64-wide network (4137 parameters)


class LectureSetup(NamedTuple):
    """One batch of the lecture's check: the parameters, the batch, the forward pass, autograd."""

    params: dict[str, Tensor]
    Xb: Tensor  # (n, T) contexts
    Yb: Tensor  # (n,) targets
    t: lecture.Intermediates  # the chunked forward pass, detached
    reference: dict[str, Tensor]  # autograd's gradient of each of the 26 tensors


def lecture_setup(
    seed: int = 2147483647, batch_size: int = 32, n_hidden: int = LECTURE_HIDDEN, input_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LectureSetup:
    """The lecture's cells: parameters, then `ix = torch.randint(...)` from the same generator."""
    ds = load_dataset(input_path, block_size=3)
    config = ModelConfig("mlp", vocab_size=ds.vocab.size, block_size=3, n_embd=10, n_hidden=n_hidden)
    g = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype) for k, v in build_model(config, g).params.items()}
    ix = torch.randint(0, ds.train.X.shape[0], (batch_size,), generator=g)  # (n,)
    Xb, Yb = ds.train.X[ix], ds.train.Y[ix]  # (n, T), (n,)
    t, reference = lecture.autograd_reference(params, Xb, Yb)
    return LectureSetup(params, Xb, Yb, t, reference)


def lecture_rows(s: LectureSetup) -> dict[str, list[Row]]:
    """The three tables: Exercise 1 (26 rows), Exercise 2 (logits), Exercise 3 (hprebn)."""
    mine = lecture.backward(s.params, s.Xb, s.Yb, s.t)
    dlogits = lecture.cross_entropy_backward(s.t.logits, s.Yb)
    dhprebn = lecture.batchnorm_backward(s.params, s.t, s.reference["hpreact"])
    return {
        "Exercise 1: backprop through every intermediate, one by one": compare_all(
            mine, s.reference, lecture.BACKWARD_ORDER
        ),
        "Exercise 2: cross-entropy backward in one go": [compare("logits", dlogits, s.reference["logits"])],
        "Exercise 3: batchnorm backward in one go": [compare("hprebn", dhprebn, s.reference["hprebn"])],
    }


def run(args: argparse.Namespace) -> int:
    if args.solution:
        from backprop_ninja.grading import run_check_solution

        return run_check_solution(args)
    if args.model != "mlp":
        from backprop_ninja.model_check import run_model_check

        return run_model_check(args)

    setup = lecture_setup(args.seed, args.batch_size, args.hidden or LECTURE_HIDDEN, args.input)
    ok = True
    for heading, rows in lecture_rows(setup).items():
        print(heading)
        for row in rows:
            print(format_row(row))
        for row in rows:
            scale = lecture.gradient_scale(row.name, setup.reference)
            if not within_rounding(row, scale):
                ok = False
            elif not row.approximate:
                print(f"note: {row.name} is right: maxdiff {row.maxdiff:.2g} is float32 rounding beside a gradient "
                      f"of {scale:.2g} (allclose's absolute 1e-8 is strict near 0)")
        print()
    if args.numerical:
        from backprop_ninja.numerical import run_numerical

        ok &= run_numerical(args)
    return 0 if ok else 1
