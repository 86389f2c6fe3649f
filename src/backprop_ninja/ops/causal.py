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
# so att[t, s] = 1/(t+1) for s <= t and 0 after. Here the same product with att built directly: at
# makemore's sizes one (T, T) @ (B, T, E) product costs less than a running sum and a division (and
# the backward's att.T @ dout less than the reversed running sum, two flips and a cumsum).


class CausalBoWCache(NamedTuple):
    counts: Tensor  # (1, T, 1) 1, 2, ..., T: how many positions each output averaged
    att: Tensor  # (T, T) the averaging weights, att[t, s] = 1/(t+1) for s <= t, 0 after


def causal_bow_forward(x: Tensor) -> tuple[Tensor, CausalBoWCache]:
    """x (B, T, E) -> out (B, T, E), out[:, t] the mean of x[:, 0..t]."""
    T = x.shape[1]
    counts = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(1, T, 1)  # (1, T, 1)
    att = torch.ones(T, T, dtype=x.dtype, device=x.device).tril_().div_(counts.view(T, 1))  # (T, T) row t: 1/(t+1) up to t
    out = att @ x  # (B, T, E) att broadcast over the batch
    return out, CausalBoWCache(counts, att)


def causal_bow_backward(dout: Tensor, cache: CausalBoWCache) -> Tensor:
    """Returns dx. In the forward pass this was: out = att @ x, out[:, t] = x[:, :t+1].sum(1) / (t+1).

    x[:, s] is in the average of every output t >= s, with weight 1/(t+1), so dx = att.T @ dout:

        dx[:, s] = sum over t >= s of dout[:, t] / (t+1)
    """
    return cache.att.T @ dout  # (B, T, E)
