"""check_backward beside torch.autograd.gradcheck on the corpus of tests/backward_corpus.py.

For every buggy op of the corpus: does each checker find the bug, how long it takes, and the first
line it tells the user. gradcheck is given what it needs: float64 inputs that require grad (it
cannot take float32 or integer ones as differentiable), at the corpus's first shape and at every
shape; check_backward its float32 inputs and the corpus's shapes, with no reference (its truth is
finite differences too, as gradcheck's).

    python benchmarks/gradcheck_compare.py [--threads 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backward_corpus import BUGGY, CORRECT  # noqa: E402

from backprop_ninja import check_backward  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--width", type=int, default=70, help="characters of each checker's message shown")
args = parser.parse_args()
torch.set_num_threads(args.threads)


def as_function(fn):
    """gradcheck calls a function of tensors: a cs231n pair becomes one through a Function."""
    if not isinstance(fn, tuple):
        return fn
    forward, backward = fn

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out, ctx.cache = forward(*inputs)
            return out

        @staticmethod
        def backward(ctx, dout):
            return backward(dout, ctx.cache)

    return Pair.apply


def gradcheck(entry, shapes):
    """(found, seconds, message) of torch.autograd.gradcheck over `shapes`."""
    fn = as_function(entry.fn)
    start = time.perf_counter()
    for shape in shapes:
        inputs = [v.detach().double().requires_grad_() if v.dtype.is_floating_point else v
                  for v in entry.make(shape, torch.float64)]
        try:
            ok = torch.autograd.gradcheck(fn, inputs, raise_exception=True, nondet_tol=0.0)
        except Exception as err:  # GradcheckError, or the engine refusing a gradient
            return True, time.perf_counter() - start, f"{type(err).__name__}: {' '.join(str(err).split())}"
        if not ok:
            return True, time.perf_counter() - start, "False"
    return False, time.perf_counter() - start, "passes"


def ours(entry):
    start = time.perf_counter()
    report = check_backward(entry.fn, lambda shape: entry.make(shape, torch.float32), shapes=entry.shapes)
    seconds = time.perf_counter() - start
    first = report.first_wrong
    if first is None:
        return False, seconds, "right"
    diagnosis = getattr(first, "diagnoses", None)
    return True, seconds, (diagnosis[0] if diagnosis else first.message)


def cut(text, n):
    return text if len(text) <= n else text[:n - 3] + "..."


rows = []
for entry in BUGGY:
    g1 = gradcheck(entry, entry.shapes[:1])
    ga = gradcheck(entry, entry.shapes)
    cb = ours(entry)
    rows.append((entry, g1, ga, cb))

w = args.width
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {len(BUGGY)} buggy ops of tests/backward_corpus.py")
print()
print(f"{'bug':44s} | {'gradcheck':9s} | {'all shapes':10s} | {'check_backward':14s} | {'s gc':>5s} | {'s cb':>5s}")
print("-" * 100)
for entry, g1, ga, cb in rows:
    mark = lambda found: "found" if found else "MISSED"  # noqa: E731
    print(f"{cut(entry.name, 44):44s} | {mark(g1[0]):9s} | {mark(ga[0]):10s} | {mark(cb[0]):14s} "
          f"| {ga[1]:5.2f} | {cb[1]:5.2f}")
print("-" * 100)
print(f"{'found':44s} | {sum(r[1][0] for r in rows):9d} | {sum(r[2][0] for r in rows):10d} | "
      f"{sum(r[3][0] for r in rows):14d} | {sum(r[2][1] for r in rows):5.2f} | {sum(r[3][1] for r in rows):5.2f}")

false_alarms_gc = sum(gradcheck(e, e.shapes)[0] for e in CORRECT)
false_alarms_cb = sum(ours(e)[0] for e in CORRECT)
print(f"{'correct ops called wrong (of ' + str(len(CORRECT)) + ')':44s} | {'':9s} | {false_alarms_gc:10d} | "
      f"{false_alarms_cb:14d} |")
print()
print("What each tells the user (gradcheck at all shapes / check_backward's diagnosis or finding):")
for entry, g1, ga, cb in rows:
    print(f"- {entry.name}")
    print(f"    gradcheck:      {cut(ga[2], w + 40)}")
    print(f"    check_backward: {cut(cb[2], w + 40)}")
