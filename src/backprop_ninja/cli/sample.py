"""`backprop-ninja sample`: words from a trained run, optionally marked new or in train/val/test."""

from __future__ import annotations

import argparse

import torch

from backprop_ninja.data import read_words, resolve_names, split_words
from backprop_ninja.sampling import MAX_LEN_FACTOR, mark, sample_words
from backprop_ninja.training import checkpoint


def run(args: argparse.Namespace) -> int:
    ckpt = checkpoint.load(args.out)
    info = ckpt.info
    g = torch.Generator().manual_seed(args.seed)
    words = sample_words(ckpt.model, info.vocab, args.num, g, max_len=MAX_LEN_FACTOR * info.max_word_len,
                         temperature=args.temperature, top_k=args.top_k)
    if not args.mark:
        print("\n".join(words))
        return 0
    source = args.input or info.input
    tags = mark(words, split_words(read_words(source if source else resolve_names())))
    print("\n".join(f"{word}\t{tag}" for word, tag in zip(words, tags)))
    return 0
