"""Sampling words from a model, all N advanced together (`backprop-ninja sample`, the end of `train`).

The lecture samples one word at a time, one character per forward pass. Here the N words move
together: one forward pass of N contexts per character position, until every word has drawn the
end token (or reached the length limit). BatchNorm is in eval mode, so each row is independent of
the others, and a seed fixes every word.

A window model reads the last block_size tokens; a model of whole words (view "sequences") reads
the word so far from its start token and predicts from its last position, as makemore's generate.
Its words stop at block_size - 1 characters, the longest its training rows hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja.data import END_TOKEN, Vocabulary
from backprop_ninja.models import Model
from backprop_ninja.threads import torch_threads

MAX_LEN_FACTOR = 2  # a sample is cut at twice the longest word of the data


@torch.no_grad()
@torch_threads(1)  # a few MFLOP per forward pass: a second thread costs more than it saves (docs/speed.md)
def sample_tokens(
    model: Model,
    n: int,
    g: torch.Generator,
    max_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """(n, max_len) token ids; each row ends at its first END_TOKEN (padded with END_TOKEN after it).

    A model of whole words draws at most block_size - 1 tokens (sample_limit)."""
    device = model.device
    words = model.view == "sequences"
    if words:
        max_len = min(max_len, sample_limit(model))
    start = 1 if words else model.config.block_size  # the start token, or a window of end tokens
    context = torch.full((n, start), END_TOKEN, dtype=torch.long, device=device)  # (n, T)
    out = torch.full((n, max_len), END_TOKEN, dtype=torch.long)  # (n, L)
    done = torch.zeros(n, dtype=torch.bool)  # (n,)
    for t in range(max_len):
        logits = model.logits(context)  # (n, V), or (n, t+1, V) for a model of whole words
        logits = (logits[:, -1] if words else logits).float().cpu() / temperature  # (n, V)
        if top_k is not None and top_k < logits.shape[1]:
            kth = torch.topk(logits, top_k, dim=1).values[:, -1:]  # (n, 1) the k-th largest logit
            logits = logits.masked_fill(logits < kth, -float("inf"))  # (n, V)
        probs = F.softmax(logits, dim=1)  # (n, V)
        ix = torch.multinomial(probs, num_samples=1, generator=g).squeeze(1)  # (n,)
        ix = ix.masked_fill(done, END_TOKEN)  # (n,) a finished word stays finished
        out[:, t] = ix
        done |= ix == END_TOKEN
        if bool(done.all()):
            break
        kept = context if words else context[:, 1:]  # a word grows; a window drops its oldest token
        context = torch.cat([kept, ix.to(device)[:, None]], dim=1)  # (n, T)
    return out


def sample_limit(model: Model) -> int:
    """The most tokens a model of whole words draws: its rows hold block_size - 1 characters and the end."""
    return model.config.block_size - 1


def sample_words(
    model: Model,
    vocab: Vocabulary,
    n: int,
    g: torch.Generator,
    max_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> list[str]:
    """n words, without the end marker."""
    tokens = sample_tokens(model, n, g, max_len, temperature, top_k)
    return [vocab.decode(row) for row in tokens.tolist()]


def mark(words: list[str], splits: dict[str, list[str]]) -> list[str]:
    """Each word's tag, as makemore sorts its samples: 'in train', 'in val', 'in test' or 'new'."""
    sets = {name: set(ws) for name, ws in splits.items()}

    def tag(word: str) -> str:
        for name in ("train", "val", "test"):
            if word in sets[name]:
                return f"in {name}"
        return "new"

    return [tag(w) for w in words]
