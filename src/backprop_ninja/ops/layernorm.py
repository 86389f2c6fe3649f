"""LayerNorm over the last dimension, as nn.LayerNorm and llm.c's layernorm_forward/backward.

Conventions (dimension letters, the gradient policy): backprop_ninja.conventions.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# layernorm (makemore's ln_1, ln_2 and ln_f, nn.LayerNorm(E)): each row of E features on its own,
#     out = (x - mean) / sqrt(var + eps) * weight + bias
# with mean and var over the last dim, var the *biased* variance (1/E, as nn.LayerNorm): unlike
# this package's BatchNorm (conventions.BATCHNORM_UNBIASED), no Bessel's correction.

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default eps (and llm.c's); a LayerNorm setting, not BatchNorm's


class LayerNormCache(NamedTuple):
    """What the backward reads: xhat and rstd, as llm.c keeps rstd and rebuilds xhat from mean and x.

    llm.c caches mean and rstd (two numbers a row) because it keeps x anyway as the layer's input
    activation; here nothing else holds x, so xhat, which is x's size, takes x's place: the backward
    needs xhat itself (dweight = sum(dout * xhat)), and the centred x - mean would still need rstd
    to become xhat. So xhat (..., E) and rstd (..., 1): no recomputation, no more memory than x.
    """

    xhat: Tensor  # (..., E) the normalised input (x - mean) * rstd
    rstd: Tensor  # (..., 1) 1 / sqrt(var + eps), one a row
    weight: Tensor  # (E,)


def layernorm_forward(x: Tensor, weight: Tensor, bias: Tensor,
                      eps: float = LAYERNORM_EPS) -> tuple[Tensor, LayerNormCache]:
    """x (..., E), weight (E,), bias (E,) -> out (..., E), each row normalised over its E features."""
    width = x.shape[-1]
    if weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"LayerNorm over the last dim of {tuple(x.shape)} takes ({width},) weight and bias, "
                         f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    xc = x - mean  # (..., E)
    var = (xc * xc).mean(-1, keepdim=True)  # (..., 1) biased: 1/E
    rstd = (var + eps).rsqrt()  # (..., 1)
    xhat = xc * rstd  # (..., E)
    out = xhat * weight + bias  # (..., E)
    return out, LayerNormCache(xhat, rstd, weight)


def layernorm_backward(dout: Tensor, cache: LayerNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx, dweight, dbias.

    In the forward pass this was: out = xhat * weight + bias, xhat = (x - mean) * rstd, with
    mean = x.mean(-1), var = ((x - mean)**2).mean(-1) (1/E) and rstd = (var + eps)**-0.5. With
    dxhat = dout * weight, x reaches xhat by three paths (directly, through the mean, through the
    variance), and the mean over the E features of each row (llm.c's two reductions):

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
                     direct  through mean   through var

    Where BatchNorm has n/(n-1) in front of the last term, the biased variance has 1.
    """
    xhat, rstd, weight = cache
    width = weight.shape[0]
    # In the forward pass this was: out = xhat * weight + bias, weight and bias broadcast over the rows
    dbias = dout.reshape(-1, width).sum(0)  # (E,)
    dweight = (dout * xhat).reshape(-1, width).sum(0)  # (E,)
    dxhat = dout * weight  # (..., E)
    # In the forward pass this was: xhat = (x - mean) * rstd
    term_mean = dxhat.mean(-1, keepdim=True)  # (..., 1) through the mean
    term_var = (dxhat * xhat).mean(-1, keepdim=True)  # (..., 1) through the variance
    dx = rstd * (dxhat - term_mean - xhat * term_var)  # (..., E)
    return dx, dweight, dbias
