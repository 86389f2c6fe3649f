"""`backprop-ninja train`: train, then print the split losses and 20 samples, as the lecture ends."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from backprop_ninja.conventions import SAMPLE_SEED
from backprop_ninja.sampling import MAX_LEN_FACTOR, sample_words
from backprop_ninja.training.evaluation import evaluate, format_losses
from backprop_ninja.training.run import train
from backprop_ninja.training.session import TrainOptions

NUM_SAMPLES_AT_END = 20


def run(args: argparse.Namespace) -> int:
    options = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    trained = train(options)
    info = trained.run.info
    if not trained.finished:
        print(f"interrupted at step {info.step}/{info.steps}; checkpoint saved in {trained.run_dir} "
              f"(continue with: backprop-ninja train --resume --out {trained.run_dir})", file=sys.stderr)
        return 130  # the shell's code for "stopped by SIGINT": `make` and scripts do not go on
    model = trained.run.model
    print(format_losses(evaluate(model, trained.run.data.dataset)))
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    for word in sample_words(model, info.vocab, NUM_SAMPLES_AT_END, g, max_len=MAX_LEN_FACTOR * info.max_word_len):
        print(word)
    return 0
