"""GELU, the tanh approximation: the transformer MLP's non-linearity. Conventions: backprop_ninja.conventions.

As torch computes F.gelu(x, approximate='tanh') (aten's GeluKernelImpl, GeluBackwardKernelImpl) and
makemore's NewGELU writes it:

    gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

GELU_BETA = math.sqrt(2.0 / math.pi)  # sqrt(2/pi); the same double as aten's M_SQRT2 * M_2_SQRTPI * 0.5
GELU_KAPPA = 0.044715


class GELUCache(NamedTuple):
    x: Tensor  # (..., H) the input
    tanh_inner: Tensor  # (..., H) tanh(sqrt(2/pi) * (x + 0.044715 x**3)), kept: the backward needs it too


def gelu_forward(x: Tensor) -> tuple[Tensor, GELUCache]:
    x_cube = x * x * x  # (..., H)
    inner = GELU_BETA * (x + GELU_KAPPA * x_cube)  # (..., H)
    tanh_inner = torch.tanh(inner)  # (..., H)
    out = 0.5 * x * (1 + tanh_inner)  # (..., H)
    return out, GELUCache(x, tanh_inner)


def gelu_backward(dout: Tensor, cache: GELUCache) -> Tensor:
    """In the forward pass this was: out = left * right, left = 0.5 * x, right = 1 + tanh(inner),
    inner = sqrt(2/pi) * (x + 0.044715 * x**3). The product rule, term by term in aten's order:

        dout/dx = 0.5 * right                                         left's derivative, times right
                + left * (1 - tanh(inner)**2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x**2)
                                                                      left, times right's derivative
    """
    x, tanh_inner = cache
    left = 0.5 * x  # (..., H)
    left_derivative = 0.5 * (1 + tanh_inner)  # (..., H)
    tanh_derivative = 1 - tanh_inner * tanh_inner  # (..., H)
    inner_derivative = GELU_BETA * (1 + 3 * GELU_KAPPA * (x * x))  # (..., H)
    right_derivative = left * tanh_derivative * inner_derivative  # (..., H)
    return dout * (left_derivative + right_derivative)  # (..., H)
