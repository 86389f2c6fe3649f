"""Cross-entropy over every position of a sequence, with ignored (padding) targets.

Conventions: backprop_ninja.conventions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja.conventions import IGNORE_INDEX

# sequence cross-entropy, as makemore:
#     loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
# the mean of -log softmax(logits[b, t])[Y[b, t]] over the n predicted positions, Y[b, t] != -1.
# makemore pads each word's targets with -1 (IGNORE_INDEX) after its end token: the padding predicts nothing.


class SequenceCrossEntropyCache(NamedTuple):
    probs: Tensor  # (B, T, V) softmax of the logits
    targets: Tensor  # (B, T) int64 correct classes, IGNORE_INDEX where ignored
    predicted: Tensor  # (B, T) bool, True where the target is not ignored
    count: int  # n, how many characters were predicted: the mean's denominator


def sequence_cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, SequenceCrossEntropyCache]:
    """logits (B, T, V), targets (B, T) int64 with -1 where ignored -> the mean loss () and the cache.

    Raises ValueError when no character is predicted (every target -1): a mean over no term is
    undefined, and F.cross_entropy would return nan.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"sequence cross-entropy takes (B, T, V) logits and (B, T) targets, "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    vocab_size = logits.shape[-1]
    predicted = targets != IGNORE_INDEX  # (B, T) bool
    count = int(predicted.sum())
    if count == 0:  # every target is -1 (a valid class label): nothing to check below
        raise ValueError(f"no predicted character: every target is {IGNORE_INDEX} (ignored), "
                         f"so the mean loss over the predicted characters is undefined")
    lowest, highest = torch.aminmax(targets)  # (), () one reduction for both bounds
    if int(lowest) < IGNORE_INDEX or int(highest) >= vocab_size:
        raise ValueError(f"targets must be classes in [0, {vocab_size}) or {IGNORE_INDEX} (ignored)")
    # F.cross_entropy is nll_loss(log_softmax(logits)): written out, so that the softmax is the exp
    # of the same log_softmax (one pass over the logits fewer than F.softmax; autograd's backward of
    # cross_entropy uses that exp too). The loss is F.cross_entropy's bit for bit.
    logprobs = F.log_softmax(logits, dim=-1)  # (B, T, V)
    loss = F.nll_loss(logprobs.view(-1, vocab_size), targets.reshape(-1), ignore_index=IGNORE_INDEX)  # ()
    probs = logprobs.exp()  # (B, T, V) softmax(logits)
    return loss, SequenceCrossEntropyCache(probs, targets, predicted, count)


def sequence_cross_entropy_backward(cache: SequenceCrossEntropyCache) -> Tensor:
    """Returns dlogits (the loss is the end of the graph: dloss = 1).

    In the forward pass this was:
        loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
    that is loss = -sum over predicted (b, t) of log(softmax(logits[b, t])[Y[b, t]]) / n. A predicted
    position gets the row of cross_entropy_backward, softmax(logits) - one_hot(Y), divided by n (the
    predicted characters, not B*T); an ignored one is in no term of the sum and gets exactly 0.

    Without indexing by the predicted positions: -1 is scattered at every row's target (an ignored
    row's -1 clamped to class 0, where it scatters -0 instead), then every row is divided by n and
    multiplied by 1 where predicted, 0 where ignored (p / n * 0 = +0: p >= 0).
    """
    classes = cache.targets.clamp(min=0).unsqueeze(-1)  # (B, T, 1) an ignored row's target -> class 0
    predicted = cache.predicted.unsqueeze(-1)  # (B, T, 1) bool
    minus_one = predicted.to(cache.probs.dtype).neg_()  # (B, T, 1) -1 where predicted, -0 where ignored
    dlogits = cache.probs.scatter_add(-1, classes, minus_one)  # (B, T, V) softmax - one_hot(Y)
    dlogits.div_(cache.count)  # (B, T, V) the mean over the n predicted characters
    return dlogits.mul_(predicted)  # (B, T, V) ignored positions: no term of the loss reads them
