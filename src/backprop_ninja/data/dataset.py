"""Word list -> vocabulary -> splits -> context windows: what a run trains and is evaluated on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from backprop_ninja.data.names import resolve_names
from backprop_ninja.data.vocab import Vocabulary
from backprop_ninja.data.windows import Split, build_dataset
from backprop_ninja.data.words import read_words, split_words


class Dataset(NamedTuple):
    vocab: Vocabulary
    block_size: int
    words: dict[str, list[str]]  # 'train' / 'val' / 'test' -> the words of that split
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_dataset(
    input_path: str | os.PathLike | None = None,
    block_size: int = 3,
    vocab: Vocabulary | None = None,
) -> Dataset:
    """Read a word list (default: names.txt), build its vocabulary and its three splits.

    Pass `vocab` (e.g. from a checkpoint) to encode with a fixed vocabulary instead of the data's.
    """
    path = Path(input_path) if input_path is not None else resolve_names()
    words = read_words(path)
    vocab = vocab or Vocabulary.from_words(words)
    splits = split_words(words)
    built = {name: build_dataset(ws, vocab, block_size) for name, ws in splits.items()}
    return Dataset(vocab, block_size, splits, built["train"], built["val"], built["test"])
