"""Gates of the recurrent cells: sigmoid. Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# sigmoid: s = 1 / (1 + exp(-x))


class SigmoidCache(NamedTuple):
    out: Tensor  # (..., H) sigmoid's output; its derivative is out * (1 - out)


def sigmoid_forward(x: Tensor) -> tuple[Tensor, SigmoidCache]:
    out = torch.sigmoid(x)  # (..., H) stable for large |x|: no exp overflows
    return out, SigmoidCache(out)


def sigmoid_backward(dout: Tensor, cache: SigmoidCache) -> Tensor:
    """In the forward pass this was: s = 1 / (1 + exp(-x)); ds/dx = s * (1 - s).

    Written in autograd's order, dout * (1 - s) * s, so that float32 results round the same way.
    """
    s = cache.out
    return dout * (1 - s) * s  # (..., H)
