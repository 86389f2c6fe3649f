"""Cross-entropy over the vocabulary, fused with its softmax. Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# cross-entropy: loss = -mean(log softmax(logits)[i, Y[i]])


class CrossEntropyCache(NamedTuple):
    probs: Tensor  # (B, V) softmax of the logits
    targets: Tensor  # (B,) int64 correct classes


def cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, CrossEntropyCache]:
    loss = F.cross_entropy(logits, targets)  # () stable: log-sum-exp with the max subtracted
    probs = F.softmax(logits, dim=1)  # (B, V)
    return loss, CrossEntropyCache(probs, targets)


def cross_entropy_backward(cache: CrossEntropyCache) -> Tensor:
    """Returns dlogits (the loss is the end of the graph: dloss = 1). The lecture's Exercise 2.

    In the forward pass this was: loss = -log(softmax(logits)[i, Y[i]]).mean(). Per row,
    dloss/dlogits = softmax(logits) - one_hot(Y): the probabilities, minus 1 at the correct
    class; the mean over the n rows divides by n.
    """
    probs, targets = cache
    n = probs.shape[0]
    dlogits = probs.clone()  # (B, V)
    dlogits[torch.arange(n, device=probs.device), targets] -= 1
    dlogits /= n
    return dlogits
