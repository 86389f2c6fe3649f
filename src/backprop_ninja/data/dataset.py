"""Word list -> vocabulary -> splits -> context windows or whole-word sequences: what a run trains
and is evaluated on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from backprop_ninja.data.names import resolve_names
from backprop_ninja.data.sequences import MAX_WORD_LENGTH, build_sequences, sequence_block_size
from backprop_ninja.data.vocab import Vocabulary
from backprop_ninja.data.windows import Split, build_dataset
from backprop_ninja.data.words import read_words, split_words
from backprop_ninja.errors import UserError

VIEWS = ("windows", "sequences")  # data.windows: (context, next char) pairs; data.sequences: whole words


class Dataset(NamedTuple):
    vocab: Vocabulary
    block_size: int
    words: dict[str, list[str]]  # 'train' / 'val' / 'test' -> the words of that split
    train: Split  # windows: X (N, T), Y (N,); sequences: X (N, T), Y (N, T) with IGNORE_INDEX padding
    val: Split
    test: Split
    view: str = "windows"

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_dataset(
    input_path: str | os.PathLike | None = None,
    block_size: int | None = 3,
    vocab: Vocabulary | None = None,
    view: str = "windows",
    max_word_length: int = MAX_WORD_LENGTH,
) -> Dataset:
    """Read a word list (default: names.txt), build its vocabulary and its three splits.

    Pass `vocab` (e.g. from a checkpoint) to encode with a fixed vocabulary instead of the data's.
    view "sequences": one row per word; block_size None means the longest word + 1 (a word longer
    than max_word_length is refused), and a given one must be at least that (a longer one only pads).
    """
    path = Path(input_path) if input_path is not None else resolve_names()
    words = read_words(path)
    vocab = vocab or Vocabulary.from_words(words)
    splits = split_words(words)
    if view == "sequences":
        longest = max(len(w) for w in words)
        if block_size is None:
            block_size = sequence_block_size(words, max_word_length, where=str(path))
        elif block_size < longest + 1:
            raise UserError(f"--block-size {block_size}: this model reads whole words, so the block must hold "
                            f"the longest word of {path.name} ({longest} characters) and its end token: "
                            f"--block-size {longest + 1} or more (the default)")
        build = build_sequences
    elif view == "windows":
        if block_size is None:
            raise ValueError("context windows need a block size")
        build = build_dataset
    else:
        raise ValueError(f"unknown view {view!r}, expected one of {VIEWS}")
    built = {name: build(ws, vocab, block_size) for name, ws in splits.items()}
    return Dataset(vocab, block_size, splits, built["train"], built["val"], built["test"], view)
