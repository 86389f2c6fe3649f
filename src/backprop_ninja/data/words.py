"""A word list: one word per line, read strictly; and the lectures' 80/10/10 split of it."""

from __future__ import annotations

import os
import random
from pathlib import Path

from backprop_ninja.errors import UserError

SPLIT_SEED = 42  # random.seed(42); random.shuffle(words), as in the lectures
SPLIT_FRACTIONS = (0.8, 0.9)  # train [0, 0.8), val [0.8, 0.9), test [0.9, 1)
SPLITS = ("train", "val", "test")


def read_words(path: str | os.PathLike) -> list[str]:
    """One item per line, UTF-8; surrounding whitespace stripped, blank lines skipped, CRLF accepted."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a word list") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if b"\x00" in raw:
        raise UserError(f"{path}: not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w]
    if not words:
        what = "the file is empty" if not text else "it has only blank lines"
        raise UserError(f"{path}: no words in the word list: {what}")
    return words


def split_words(words: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Shuffle a copy with random.seed(seed) and cut 80/10/10, as the lecture does."""
    words = list(words)
    rng = random.Random(seed)  # same stream as random.seed(42); random.shuffle(words)
    rng.shuffle(words)
    n1 = int(SPLIT_FRACTIONS[0] * len(words))
    n2 = int(SPLIT_FRACTIONS[1] * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
