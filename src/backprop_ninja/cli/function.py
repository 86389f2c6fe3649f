"""`backprop-ninja check --function FILE:NAME`: an engineer's own backward pass, checked in a child process.

FILE defines NAME (a torch.autograd.Function, a callable, or a (forward, backward) tuple; or the
functions NAME_forward and NAME_backward) and make_inputs(shape_or_seed); optionally SHAPES and
NAME_reference. Exit 0 right, 1 wrong, 2 when it cannot be checked.
"""

from __future__ import annotations

import argparse

from backprop_ninja.checking.isolated import check_file
from backprop_ninja.errors import UserError


def run(args: argparse.Namespace) -> int:
    path, sep, name = args.function.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise UserError(f"--function {args.function}: expected FILE.py:NAME, e.g. my_op.py:MyLayerNorm")
    if args.solution or args.numerical:
        raise UserError("--function checks one op on its own: --solution and --numerical do not apply")
    report = check_file(path, name, timeout=args.timeout, seed=0)
    print(report)
    return report.exit_code
