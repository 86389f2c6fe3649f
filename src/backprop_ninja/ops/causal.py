"""The causal bag of words: each position averages itself and the positions before it.

Conventions: backprop_ninja.conventions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# causal bag of words (makemore's CausalBoW): out[:, t] = x[:, :t+1].mean(1)
#
# makemore writes it as attention with uniform weights over the past:
#     att = zeros(T, T).masked_fill(tril == 0, -inf); att = softmax(att, -1); out = att @ x
# so att[t, s] = 1/(t+1) for s <= t and 0 after. Here: a running sum divided by the count, O(T).


class CausalBoWCache(NamedTuple):
    counts: Tensor  # (1, T, 1) 1, 2, ..., T: how many positions each output averaged


def causal_bow_forward(x: Tensor) -> tuple[Tensor, CausalBoWCache]:
    """x (B, T, E) -> out (B, T, E), out[:, t] the mean of x[:, 0..t]."""
    T = x.shape[1]
    counts = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(1, T, 1)  # (1, T, 1)
    out = x.cumsum(1) / counts  # (B, T, E)
    return out, CausalBoWCache(counts)


def causal_bow_backward(dout: Tensor, cache: CausalBoWCache) -> Tensor:
    """Returns dx. In the forward pass this was: out[:, t] = x[:, :t+1].sum(1) / (t+1).

    x[:, s] is in the average of every output t >= s, with weight 1/(t+1) (in matrix form
    out = att @ x, so dx = att.T @ dout):

        dx[:, s] = sum over t >= s of dout[:, t] / (t+1)

    a running sum of dout / counts taken from the last position backwards.
    """
    scaled = dout / cache.counts  # (B, T, E)
    return scaled.flip(1).cumsum(1).flip(1)  # (B, T, E)
