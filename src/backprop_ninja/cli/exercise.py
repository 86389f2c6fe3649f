"""`backprop-ninja exercise FILE [--force]`: write the starter solution."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from backprop_ninja.grading.starter import write_starter


def run(args: argparse.Namespace) -> int:
    dest = Path(args.file)
    write_starter(dest, force=args.force)
    print(f"wrote {dest}: fill in the gradients, one line at a time, then run")
    print(f"  backprop-ninja check --solution {shlex.quote(str(dest))}")
    return 0
