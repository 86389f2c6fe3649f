"""out = x @ W + b, with W of shape (fan_in, fan_out). Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# linear: out = x @ W + b


class LinearCache(NamedTuple):
    x: Tensor  # (..., F) the input
    w: Tensor  # (F, H) the weights
    has_bias: bool


def linear_forward(x: Tensor, w: Tensor, b: Tensor | None = None) -> tuple[Tensor, LinearCache]:
    out = x @ w  # (..., H)
    if b is not None:
        out = out + b  # (..., H)
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout: Tensor, cache: LinearCache) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns dx, dW, db (db is None without a bias). In the forward pass: out = x @ W + b."""
    x, w = cache.x, cache.w
    fan_in, fan_out = w.shape
    dx = dout @ w.T  # (..., F)
    # every leading position (batch, and time for 3-D inputs) used the same W and b: sum over them
    x2d = x.reshape(-1, fan_in)  # (B*, F)
    dout2d = dout.reshape(-1, fan_out)  # (B*, H)
    dw = x2d.T @ dout2d  # (F, H)
    db = dout2d.sum(0) if cache.has_bias else None  # (H,): b was broadcast over the rows
    return dx, dw, db
