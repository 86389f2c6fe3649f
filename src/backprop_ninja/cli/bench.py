"""`backprop-ninja bench`: the autograd loop against the hand-written steps (bench.py measures)."""

from __future__ import annotations

import argparse

from backprop_ninja import bench


def run(args: argparse.Namespace) -> int:
    return bench.main(args.steps, args.large_batch, args.json, args.threads, args.model)
