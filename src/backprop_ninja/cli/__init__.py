"""The command line: argparse subcommands, each handed to the module that does the work.

    backprop-ninja check      prove every hand-written gradient against autograd (and grade yours)
    backprop-ninja exercise   write a starter solution file for `check --solution`
    backprop-ninja train      train a model with hand-written gradients only
    backprop-ninja eval       the split losses of a trained run
    backprop-ninja sample     words from a trained run
    backprop-ninja bench      time the autograd loop against the hand-written paths

A user's mistake (bad file, bad value) is one line on stderr and a non-zero exit, no traceback.
Each subcommand is one thin module here (cli/check.py, ...): it turns the options into a call of
the library and prints the result. This module imports no torch, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading

from backprop_ninja.conventions import LECTURE_SEED, SAMPLE_SEED
from backprop_ninja.errors import UserError

PROG = "backprop-ninja"


# ---------------------------------------------------------------------------------------------
# value checks: argparse reports them as "argument --x: ..." in one line


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the steps, 0 <= F < 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


positive_int = _int_at_least(1)
# BatchNorm's Bessel correction divides by n - 1: a batch needs two examples
batch_size_type = _int_at_least(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # check --------------------------------------------------------------------------------
    p = sub.add_parser("check", help="prove each hand-written gradient against autograd")
    p.set_defaults(handler="backprop_ninja.cli.check:run")
    g = p.add_argument_group("network")
    g.add_argument("--model", default="mlp", help="the lecture network (mlp) or a model of `train --model`")
    g.add_argument("--seed", type=int, default=LECTURE_SEED, help="seed of the initialisation and batch")
    g.add_argument("--batch-size", type=batch_size_type, default=32, help="examples in the batch")
    g.add_argument("--hidden", type=positive_int,
                   help="hidden width (default: 64 for the lecture's mlp, the model's own for the others)")
    g.add_argument("--input", metavar="FILE", help="word list (default: the names data set)")
    g = p.add_argument_group("what to check")
    g.add_argument("--numerical", action="store_true",
                   help="also compare with float64 central finite differences")
    g.add_argument("--solution", metavar="FILE",
                   help="grade your own backward pass in FILE (see `backprop-ninja exercise`)")
    g.add_argument("--function", metavar="FILE:NAME",
                   help="check your own op NAME in FILE (a Function, or NAME_forward/NAME_backward, and make_inputs)")
    g.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                   help="time limit in seconds for each call of your code, and for running FILE (default: 60)")
    g.add_argument("--notebook", nargs="+", metavar="NB",
                   help="grade your own notebook(s): every cell in a fresh Jupyter kernel, each gradient against autograd")
    g.add_argument("--data", metavar="FILE", help="--notebook: the names data set (default: $BACKPROP_NINJA_DATA, "
                   "else the package's own copy)")
    g.add_argument("--json", action="store_true", help="--notebook: one JSON record per notebook")
    g.add_argument("--exercises", default="1,2,3,4", metavar="1,2,3,4", help="--notebook: the exercises to grade")

    # exercise -----------------------------------------------------------------------------
    p = sub.add_parser("exercise", help="write a starter solution file to grade with check --solution")
    p.set_defaults(handler="backprop_ninja.cli.exercise:run")
    p.add_argument("file", metavar="FILE", help="where to write the starter solution")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    # train --------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train with hand-written gradients only")
    p.set_defaults(handler="backprop_ninja.cli.train:run")
    g = p.add_argument_group("input/output")
    g.add_argument("--input", metavar="FILE", help="word list, one per line (default: the names data set)")
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/MODEL)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out up to --steps in total")
    g.add_argument("--plots", action="store_true", help="write the training plots into the run directory")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="which network: mlp (default, the lecture's), deep-mlp, wavenet, bigram, rnn, gru, "
                                   "bow, transformer")
    g.add_argument("--block-size", type=positive_int,
                   help="context length (default: the model's; for models of whole words the longest word + 1, "
                        "and at least that)")
    g.add_argument("--max-word-length", type=positive_int, metavar="N",
                   help="models of whole words: refuse a word list whose longest word has more than N characters "
                        "(default: 64)")
    g.add_argument("--embd", type=positive_int, help="embedding width (default: the model's)")
    g.add_argument("--hidden", type=positive_int, help="hidden width (default: the model's)")
    g.add_argument("--layers", type=positive_int, help="transformer: blocks (default: 4)")
    g.add_argument("--heads", type=positive_int, help="transformer: attention heads, dividing --embd (default: 4)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=positive_int, help="total training steps (default: the model's recipe)")
    # no defaults here: train fills them in, and a resumed run tells a given option from an omitted one
    g.add_argument("--batch-size", type=batch_size_type, help="examples per step (default: 32)")
    g.add_argument("--lr", type=_positive_float,
                   help="learning rate before the decay to lr/10 (default: 0.1 for sgd, 5e-4 for adamw, "
                        "2e-3 for the transformer)")
    g.add_argument("--seed", type=int, help=f"fixes initialisation and batches (default: {LECTURE_SEED})")
    g.add_argument("--optimizer", choices=("sgd", "adamw"),
                   help="the update written by hand (default: sgd for the lectures' models, adamw for makemore's "
                        "models of whole words)")
    g.add_argument("--weight-decay", type=_non_negative_float, metavar="W",
                   help="decoupled weight decay (default: 0 for sgd, 0.01 for adamw, 0.05 for the "
                        "transformer)")
    g.add_argument("--clip-grad-norm", type=_positive_float, metavar="X",
                   help="scale each step's gradients down to a global norm of at most X (default: off, as makemore)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    averaging = g.add_mutually_exclusive_group()
    averaging.add_argument("--average-from", type=_fraction, metavar="F",
                           help="report the weights averaged over the steps after this fraction of the run "
                                "(stochastic weight averaging; default: the model's recipe, 0.75 for wavenet, "
                                "0.7 for the transformer, none else)")
    averaging.add_argument("--no-average", action="store_true", help="report the last weights, not an average")
    g.add_argument("--verify-every", type=positive_int, metavar="N",
                   help="every N steps, check the hand-written gradients against autograd")
    g.add_argument("--eager", action="store_true",
                   help="train with the readable layer-by-layer step instead of the fast fused one")

    # eval ---------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="the train/val/test losses of a trained run")
    p.set_defaults(handler="backprop_ninja.cli.eval:run")
    p.add_argument("--out", metavar="DIR", default="runs/mlp", help="run directory (default: runs/mlp)")
    p.add_argument("--input", metavar="FILE", help="word list (default: the one the run trained on)")
    p.add_argument("--json", action="store_true", help='print {"train": x, "val": y, "test": z}')
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")

    # sample -------------------------------------------------------------------------------
    p = sub.add_parser("sample", help="sample words from a trained run")
    p.set_defaults(handler="backprop_ninja.cli.sample:run")
    p.add_argument("--out", metavar="DIR", default="runs/mlp", help="run directory (default: runs/mlp)")
    p.add_argument("-n", "--num", type=positive_int, default=20, help="how many words (default: 20)")
    p.add_argument("--seed", type=int, default=SAMPLE_SEED, help="sampling seed (the lecture's + 10)")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=positive_int, help="sample among the k most likely characters only")
    p.add_argument("--mark", action="store_true",
                   help="mark each word as new, or as in the train/val/test words")
    p.add_argument("--input", metavar="FILE", help="word list for --mark (default: the run's)")

    # bench --------------------------------------------------------------------------------
    p = sub.add_parser("bench", help="time the autograd loop, the eager and the fast hand-written path")
    p.set_defaults(handler="backprop_ninja.cli.bench:run")
    p.add_argument("--steps", type=positive_int, default=2000, help="timed steps per loop")
    p.add_argument("--large-batch", type=batch_size_type, default=4096, help="the large batch size")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads for the autograd and eager loops (default: torch's own)")
    p.add_argument("--model", default="mlp",
                   help="the model to time, at its default shape (default: the lecture MLP, mlp)")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # e.g. `backprop-ninja sample -n 1000 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (which saves and says where)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `backprop-ninja` command: main(), then exit without Python's module-by-module teardown,
    which is slow in a process that imported torch (docs/speed.md), as mypy's --fast-exit does. Every
    file the command writes is closed (and fsynced) before main() returns; logging and the output
    are flushed here. The fast exit is taken only where nothing else could still need the teardown:
    no other non-daemon thread alive, torch.distributed not initialised."""
    code = main()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away, or a stream closed above
        pass
    if fast_exit_is_safe():
        os._exit(code)
    sys.exit(code)


def fast_exit_is_safe() -> bool:
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        return False
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return False
    return True


if __name__ == "__main__":
    entry()
