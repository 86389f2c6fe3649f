"""Whole words as sequences: the view of a word list that makemore's bigram, rnn, gru, bow and
transformer train on.

Each word is one row, as makemore's CharDataset builds it:

    x = [start] + the word's characters, padded with 0      (start = end = token 0)
    y = the characters + [end], padded with IGNORE_INDEX     (-1: the loss skips it)

so position t of x predicts y[t], the character after x[:t+1]. The block size is the longest word
+ 1 (16 on names.txt): every word, with its end token, fits in one row. The predicted characters
(y != -1) are exactly the targets of the context windows (data.windows), so a mean loss over them
compares directly with the window models'.
"""

from __future__ import annotations

import torch

from backprop_ninja.conventions import IGNORE_INDEX
from backprop_ninja.data.vocab import END_TOKEN, Vocabulary
from backprop_ninja.data.windows import Split
from backprop_ninja.errors import UserError

# Words longer than this are refused unless --max-word-length raises it: every row is as long as
# the longest word, so one huge line would make every batch that long (a 100k-character line:
# 3 GB of hidden states per step for the rnn). 64 is 4x names.txt's longest word.
MAX_WORD_LENGTH = 64


def sequence_block_size(words: list[str], max_word_length: int = MAX_WORD_LENGTH, where: str = "the word list") -> int:
    """The longest word + 1; a word longer than max_word_length is one clear error."""
    longest = max(words, key=len)
    if len(longest) > max_word_length:
        shown = longest if len(longest) <= 40 else longest[:37] + "..."
        raise UserError(
            f"{where}: the longest word ({shown!r}) has {len(longest)} characters, more than the limit of "
            f"{max_word_length} for models that read whole words (each row is as long as the longest word); "
            f"raise it with --max-word-length, or shorten the word"
        )
    return len(longest) + 1


def build_sequences(words: list[str], vocab: Vocabulary, block_size: int) -> Split:
    """X (N, block_size) inputs and Y (N, block_size) targets, one row per word (see the module's doc)."""
    N = len(words)
    lengths = torch.tensor([len(w) for w in words], dtype=torch.long)  # (N,)
    if N and int(lengths.max()) + 1 > block_size:
        word = words[int(lengths.argmax())]
        raise UserError(f"the word {word!r} ({len(word)} characters) does not fit a block of {block_size}: "
                        f"models that read whole words need --block-size >= {len(word) + 1}")
    ids = torch.tensor([i for w in words for i in vocab.encode(w)], dtype=torch.long)  # (S,) every character
    rows = torch.arange(N).repeat_interleave(lengths)  # (S,) the word of each character
    cols = torch.arange(ids.shape[0]) - (torch.cumsum(lengths, 0) - lengths).repeat_interleave(lengths)  # (S,)
    X = torch.full((N, block_size), END_TOKEN, dtype=torch.long)  # (N, T)
    Y = torch.full((N, block_size), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    X[rows, cols + 1] = ids  # x = [start] + characters
    Y[rows, cols] = ids  # y = characters ...
    Y[torch.arange(N), lengths] = END_TOKEN  # ... + [end]
    return Split(X, Y)
