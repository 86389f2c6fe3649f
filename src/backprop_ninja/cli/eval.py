"""`backprop-ninja eval`: the train/val/test losses of a trained run."""

from __future__ import annotations

import argparse
import json

from backprop_ninja.training import checkpoint
from backprop_ninja.training.devices import resolve_device
from backprop_ninja.training.evaluation import evaluate, format_losses, load_run_data


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    ckpt = checkpoint.load(args.out, device)
    info = ckpt.info
    data = load_run_data(args.input or info.input, info.config.block_size, vocab=info.vocab, view=ckpt.model.view)
    losses = evaluate(ckpt.model, data.dataset)
    print(json.dumps(losses) if args.json else format_losses(losses))
    return 0
