"""`backprop-ninja check`: the lecture's table (and --numerical), --model NAME, or --solution FILE."""

from __future__ import annotations

import argparse

import torch

from backprop_ninja.checking import lecture_check, model_check
from backprop_ninja.checking.finite_differences import NumericalRow, summary_line
from backprop_ninja.checking.verdict import FD_ATOL, FD_EPS, FD_RTOL, format_row
from backprop_ninja.errors import UserError
from backprop_ninja.grading.grade import grade
from backprop_ninja.lecture.fixture import LECTURE_HIDDEN, lecture_setup
from backprop_ninja.models import get_spec


def run(args: argparse.Namespace) -> int:
    if args.function:
        from backprop_ninja.cli.function import run as run_function

        return run_function(args)
    if args.notebook:
        from backprop_ninja.cli.notebook import run as run_notebooks

        return run_notebooks(args)
    if args.solution:
        return run_solution(args)
    if args.model != "mlp":
        return run_model(args)
    return run_lecture(args)


def run_lecture(args: argparse.Namespace) -> int:
    """The lecture's table for Exercises 1-3; exit 0 when every row's verdict is right."""
    hidden = args.hidden or LECTURE_HIDDEN
    s32 = lecture_setup(args.seed, args.batch_size, hidden, args.input)
    s64 = lecture_setup(args.seed, args.batch_size, hidden, args.input, dtype=torch.float64)
    ok = True
    for heading, rows in lecture_check.lecture_rows(s32, s64).items():
        print(heading)
        for checked in rows:
            print(format_row(checked.row))
        for row, verdict in rows:
            scale = lecture_check.lecture_scale(row.name, s32)
            if not verdict.right:
                ok = False
                print(f"wrong: {row.name} {verdict.reason}")
            elif not row.approximate:
                print(f"note: {row.name} is right: maxdiff {row.maxdiff:.2g} is float32 rounding beside a gradient "
                      f"of {scale:.2g} (allclose's absolute 1e-8 is strict near 0)")
        print()
    if args.numerical:
        print(f"Numerical check: float64 central differences (eps {FD_EPS:g}, atol {FD_ATOL:g}, rtol {FD_RTOL:g})")
        ok &= print_numerical(lecture_check.numerical_rows(s32.params, s32.Xb, s32.Yb, args.seed))
    return 0 if ok else 1


def run_model(args: argparse.Namespace) -> int:
    spec = get_spec(args.model)
    model, Xb, Yb = model_check.model_setup(args.model, args.seed, args.batch_size, args.hidden, args.input)
    c = model.config
    print(f"{c.model} ({spec.summary})")
    shape = ", ".join(f"{k} {v}" for k, v in c.to_dict().items() if k not in ("model", "vocab_size"))
    print(f"{shape}, {model.num_params():,} parameters; a batch of {len(Yb)}, seed {args.seed}")
    print()
    print("Every layer output (L<i> <layer>) and parameter, hand-written backward vs autograd, in float64")
    rows = model_check.model_rows(model, Xb, Yb)
    for row, _ in rows:
        print(format_row(row))
    wrong = [(row, verdict) for row, verdict in rows if not verdict.right]
    for row, verdict in wrong:
        print(f"wrong: {row.name} {verdict.reason}")
    ok = not wrong
    if args.numerical:
        print()
        print(f"Float64 central differences (eps {FD_EPS:g}, atol {FD_ATOL:g}, rtol {FD_RTOL:g}) "
              f"on up to {model_check.FD_ENTRIES} entries per parameter")
        ok &= print_numerical(model_check.numerical_rows(model, Xb, Yb, args.seed))
    return 0 if ok else 1


def print_numerical(rows: list[NumericalRow]) -> bool:
    for row in rows:
        print(row)
    print(summary_line(rows))
    return all(row.ok for row in rows)


def run_solution(args: argparse.Namespace) -> int:
    """`backprop-ninja check --solution FILE`."""
    if args.model != "mlp":
        raise UserError(f"--solution grades the lecture network; --model {args.model} does not apply")
    if args.numerical:
        raise UserError("--solution and --numerical do not combine: the grader compares with autograd")
    hidden = args.hidden or LECTURE_HIDDEN
    result = grade(file=args.solution, seed=args.seed, batch_size=args.batch_size, n_hidden=hidden, input=args.input,
                   timeout=args.timeout)
    return result.exit_code


