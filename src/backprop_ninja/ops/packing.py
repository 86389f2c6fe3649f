"""Packing: a batch of padded sequences (B, T, ...) <-> its live positions, one row each (R, ...).

A word of n characters fills n + 1 positions of its row; the rest of the block is padding, whose
targets are IGNORE_INDEX. Position t of a sequence is *live* when the loss predicts a character at
t or after it: in a causal model nothing at a later position reaches an earlier one, so a position
past the last predicted one reaches no term of the loss, and its gradient is exactly zero.
A pass that computes the loss (a training step, a split's evaluation) may run its position-wise
layers (LayerNorm, Linear, GELU, dropout) on the live rows only, and put them back in their (B, T)
places where positions meet (the attention).

    packing = live_packing(Y)                   # Y (B, T) targets -> which positions are live
    rows, cache = pack_forward(x, packing)      # (B, T', ...) -> (R, ...)   T' = packing.positions
    x, cache = unpack_forward(rows, packing)    # (R, ...) -> (B, T', ...), zeros at the dead positions
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.conventions import IGNORE_INDEX


class Packing(NamedTuple):
    index: Tensor  # (R,) int64: b * T' + t of each live position, in row-major order
    lengths: Tensor  # (B,) int64: the live positions of each sequence (R in all), its rows in order
    batch: int  # B
    positions: int  # T': the batch's longest live prefix (its columns past that are dead)


def live_packing(Y: Tensor) -> Packing:
    """Y (B, T) targets, IGNORE_INDEX where nothing is predicted -> the live positions of the batch.

    The live prefix of row b ends at its last predicted position (an ignored target inside it
    stays live: a later prediction reads it); the batch keeps T' = its longest live prefix.
    """
    B, T = Y.shape
    ends = torch.arange(1, T + 1, device=Y.device)  # (T,) 1 + each position
    live_length = ((Y != IGNORE_INDEX) * ends).amax(1)  # (B,) 1 + the last predicted position, 0 if none
    positions = int(live_length.max())
    live = torch.arange(positions, device=Y.device) < live_length[:, None]  # (B, T') bool
    return Packing(live.reshape(-1).nonzero().squeeze(1), live_length, B, positions)  # (R,), (B,)


# pack: rows = x[live positions]


class PackCache(NamedTuple):
    packing: Packing


def pack_forward(x: Tensor, packing: Packing) -> tuple[Tensor, PackCache]:
    """x (B, T', ...) -> the live positions' rows (R, ...)."""
    rows = x.reshape(packing.batch * packing.positions, *x.shape[2:])[packing.index]  # (R, ...)
    return rows, PackCache(packing)


def pack_backward(drows: Tensor, cache: PackCache) -> Tensor:
    """Returns dx. In the forward pass this was: rows = x[live]; a dead position was read by no row: 0."""
    return _scatter(drows, cache.packing)  # (B, T', ...)


# unpack: x[live positions] = rows, zeros elsewhere


class UnpackCache(NamedTuple):
    packing: Packing


def unpack_forward(rows: Tensor, packing: Packing) -> tuple[Tensor, UnpackCache]:
    """rows (R, ...) -> (B, T', ...) with each row in its place and zeros at the dead positions."""
    return _scatter(rows, packing), UnpackCache(packing)  # (B, T', ...)


def unpack_backward(dx: Tensor, cache: UnpackCache) -> Tensor:
    """Returns drows. In the forward pass this was: x[live] = rows, so each row's gradient is its place's."""
    packing = cache.packing
    return dx.reshape(packing.batch * packing.positions, *dx.shape[2:])[packing.index]  # (R, ...)


def _scatter(rows: Tensor, packing: Packing) -> Tensor:
    """(R, ...) -> (B, T', ...): each row at its live position, zeros elsewhere."""
    out = rows.new_zeros(packing.batch * packing.positions, *rows.shape[1:])  # (B*T', ...)
    out[packing.index] = rows  # (B*T', ...)
    return out.view(packing.batch, packing.positions, *rows.shape[1:])  # (B, T', ...)
