"""Context windows: every (block_size previous tokens, next token) pair of every word.

The view of a word list that the lectures' MLP, deep MLP and wavenet train on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop_ninja.data.vocab import END_TOKEN, Vocabulary
from backprop_ninja.errors import UserError


class Split(NamedTuple):
    X: torch.Tensor  # (N, block_size) int64 contexts
    Y: torch.Tensor  # (N,) int64 next-character targets


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
