"""Word list -> vocabulary -> context windows -> train/val/test splits.

Exactly the data pipeline of the makemore lectures (`build_dataset`, `random.seed(42)`, 80/10/10),
with one correction: the start/end token is index 0 and is *not* a character of the data, so a
'.' inside a word (e.g. "st. john") stays an ordinary character.
"""

from __future__ import annotations

import hashlib
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch

from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write

# ---------------------------------------------------------------------------------------------
# the default data set: names.txt of the makemore repository

NAMES_FILE = "names.txt"
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
DATA_ENV = "BACKPROP_NINJA_DATA"  # a folder that holds names.txt
URL_ENV = "BACKPROP_NINJA_DATA_URL"  # where to download it from (tests point it at 127.0.0.1)
DOWNLOAD_TIMEOUT_S = 30

SPLIT_SEED = 42  # random.seed(42); random.shuffle(words), as in the lectures
SPLIT_FRACTIONS = (0.8, 0.9)  # train [0, 0.8), val [0.8, 0.9), test [0.9, 1)


def cache_dir() -> Path:
    """The user cache directory, e.g. ~/.cache/backprop-ninja on Linux."""
    from platformdirs import user_cache_path

    return user_cache_path("backprop-ninja")


def resolve_names() -> Path:
    """Find names.txt: $BACKPROP_NINJA_DATA, then the user cache, then one verified download."""
    env_dir = os.environ.get(DATA_ENV)
    if env_dir:
        candidate = Path(env_dir) / NAMES_FILE
        if candidate.is_file():
            return candidate
    cached = cache_dir() / NAMES_FILE
    if cached.is_file() and _sha256(cached) == NAMES_SHA256:
        return cached
    return download_names(cached)


def download_names(dest: Path, url: str | None = None) -> Path:
    """Download names.txt to `dest` once, verify its sha256, and move it in place atomically."""
    url = url or os.environ.get(URL_ENV) or NAMES_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot download the names data set from {url} ({reason}); "
            f"offline? pass a word list with --input FILE, or set {DATA_ENV} to a folder holding {NAMES_FILE}"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != NAMES_SHA256:
        raise UserError(
            f"downloaded {url} but its sha256 is {digest}, expected {NAMES_SHA256}; refusing to use it"
        )
    atomic_write(dest, payload)
    return dest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# word list


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


# ---------------------------------------------------------------------------------------------
# vocabulary

END_TOKEN = 0  # starts every context and ends every word; not a character of the data


@dataclass(frozen=True)
class Vocabulary:
    """The sorted characters of the data; index 0 is the start/end token, characters are 1..len."""

    chars: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocabulary":
        return cls(tuple(sorted(set("".join(words)))))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @cached_property
    def stoi(self) -> dict[str, int]:
        return {ch: i + 1 for i, ch in enumerate(self.chars)}

    def encode(self, word: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[ch] for ch in word]
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} of {word!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """Token ids -> text; the end token (and anything after it) is not printed."""
        out = []
        for i in ids:
            i = int(i)
            if i == END_TOKEN:
                break
            out.append(self.chars[i - 1])
        return "".join(out)

    def display(self, i: int) -> str:
        """How the lecture prints one token: '.' for the end token."""
        return "." if i == END_TOKEN else self.chars[i - 1]


# ---------------------------------------------------------------------------------------------
# context windows and splits


class Split(NamedTuple):
    X: torch.Tensor  # (N, block_size) int64 contexts
    Y: torch.Tensor  # (N,) int64 next-character targets


class Dataset(NamedTuple):
    vocab: Vocabulary
    block_size: int
    words: dict[str, list[str]]  # 'train' / 'val' / 'test' -> the words of that split
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def build_dataset(words: list[str], vocab: Vocabulary, block_size: int) -> Split:
    """Every (context, next character) pair of every word, as the lecture's build_dataset:

        for w in words:
            context = [0] * block_size
            for ch in w + '.':
                X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]

    vectorised (that loop takes a second on names.txt; this takes a few milliseconds): lay the words
    out as one token stream, each preceded by block_size end tokens and followed by one, and cut a
    window of block_size tokens before every position that is a target.
    """
    if not words:
        return Split(torch.zeros(0, block_size, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    pad = "\0" * block_size  # NUL is never a character of the data (read_words refuses it)
    text = pad + ("\0" + pad).join(words) + "\0"
    codepoints = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)  # (S,)
    vocab_codepoints = torch.tensor([ord(ch) for ch in vocab.chars], dtype=torch.int32)  # (V-1,) sorted
    unknown = ~torch.isin(codepoints, vocab_codepoints) & (codepoints != 0)  # (S,)
    if unknown.any():
        ch = chr(codepoints[unknown].min().item())
        raise UserError(f"character {ch!r} of the word list is not in the vocabulary")
    stream = torch.searchsorted(vocab_codepoints, codepoints) + 1  # (S,) token ids, chars from 1
    stream[codepoints == 0] = END_TOKEN
    # targets: each word's characters and the end token after it, i.e. every position but the pads
    targets_per_word = torch.tensor([len(w) + 1 for w in words])  # (W,)
    word_starts = torch.cumsum(targets_per_word + block_size, 0) - targets_per_word  # (W,)
    first_target = torch.cumsum(targets_per_word, 0) - targets_per_word  # (W,) index in Y
    n_targets = int(targets_per_word.sum())
    offset_in_word = torch.arange(n_targets) - first_target.repeat_interleave(targets_per_word)  # (N,)
    positions = word_starts.repeat_interleave(targets_per_word) + offset_in_word  # (N,)
    window = torch.arange(-block_size, 0)  # (block_size,) the positions before a target
    X = stream[positions[:, None] + window].long()  # (N, block_size)
    Y = stream[positions].long()  # (N,)
    return Split(X, Y)


class Contexts(NamedTuple):
    rows: torch.Tensor  # (U, block_size) int64, each distinct context once
    index: torch.Tensor  # (N,) int64: X[i] == rows[index[i]]
    counts: torch.Tensor  # (U,) int64: how many rows of X are rows[u]


def distinct_contexts(X: torch.Tensor) -> Contexts:
    """The distinct rows of X (N, T) int64 ids, where each row of X is among them, and their counts.

    Contexts repeat: the names set's 182,625 training windows of block size 3 hold 5,438 distinct
    contexts. The network's output for a context does not depend on the others in eval mode, so
    evaluation and BatchNorm calibration run the network once per distinct context and weigh it
    by its count. Each row is packed into one int64 key (base = the largest id + 1), which sorts
    in milliseconds where torch.unique(dim=0) takes a third of a second.
    """
    N, T = X.shape
    base = int(X.max()) + 1 if N else 1
    if base**T >= 2**62:  # the key would overflow: unique on whole rows, slower but exact
        rows, index, counts = torch.unique(X, dim=0, return_inverse=True, return_counts=True)
        return Contexts(rows, index, counts)
    powers = base ** torch.arange(T - 1, -1, -1, dtype=torch.int64)  # (T,)
    keys = (X * powers).sum(1)  # (N,)
    unique_keys, index, counts = torch.unique(keys, return_inverse=True, return_counts=True)  # (U,), (N,), (U,)
    rows = X.new_empty((unique_keys.shape[0], T))  # (U, T)
    rows[index] = X  # every copy of a context writes the same row
    return Contexts(rows, index, counts)


def split_words(words: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Shuffle a copy with random.seed(seed) and cut 80/10/10, as the lecture does."""
    words = list(words)
    rng = random.Random(seed)  # same stream as random.seed(42); random.shuffle(words)
    rng.shuffle(words)
    n1 = int(SPLIT_FRACTIONS[0] * len(words))
    n2 = int(SPLIT_FRACTIONS[1] * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


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
