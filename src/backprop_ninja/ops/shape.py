"""Ops that only move numbers: flattening consecutive positions. Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# flatten consecutive: (B, T, E) -> (B, T/k, k*E); the lecture's emb.view(B, -1) is k = T


class FlattenCache(NamedTuple):
    in_shape: torch.Size  # shape of the input, to undo the view


def flatten_consecutive_forward(x: Tensor, k: int) -> tuple[Tensor, FlattenCache]:
    """Concatenate each run of k consecutive position vectors: (B, T, E) -> (B, T/k, k*E).

    When one group is left (k == T) the position axis is dropped, (B, T*E), as in makemore part 5,
    so that what follows is an ordinary 2-D Linear/BatchNorm.
    """
    B, T, E = x.shape
    if k < 1 or T % k:
        raise ValueError(f"cannot flatten {T} positions in groups of {k}")
    out = x.reshape(B, T // k, k * E)  # (B, T/k, k*E)
    if T == k:
        out = out.squeeze(1)  # (B, k*E)
    return out, FlattenCache(x.shape)


def flatten_consecutive_backward(dout: Tensor, cache: FlattenCache) -> Tensor:
    """In the forward pass this was: out = x.view(B, T//k, k*E). A view moves no numbers."""
    return dout.reshape(cache.in_shape)  # (B, T, E)
