"""Elementwise non-linearities: tanh. Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# tanh: h = tanh(x)


class TanhCache(NamedTuple):
    out: Tensor  # (..., H) tanh's output; its derivative is 1 - out**2


def tanh_forward(x: Tensor) -> tuple[Tensor, TanhCache]:
    out = torch.tanh(x)  # (..., H)
    return out, TanhCache(out)


def one_minus_square(h: Tensor) -> Tensor:
    """1 - h**2, rounded once.

    Autograd's tanh backward computes 1 - h*h with a fused multiply-add on CPUs that have one: a
    single rounding. Plain `1.0 - h**2` rounds h**2 first and so can differ in the last bit, and
    that bit spreads to every gradient below the tanh. In float64, h*h of a float32 h is exact
    (24 + 24 bits < 53), so the float64 subtraction followed by one cast rounds like the fused op.
    """
    if h.dtype == torch.float64:
        return 1.0 - h * h
    h64 = h.double()
    return (1.0 - h64 * h64).to(h.dtype)


def tanh_backward(dout: Tensor, cache: TanhCache) -> Tensor:
    """In the forward pass this was: h = tanh(x); d tanh(x)/dx = 1 - h**2."""
    return one_minus_square(cache.out) * dout  # (..., H)
