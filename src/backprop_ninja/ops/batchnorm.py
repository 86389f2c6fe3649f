"""BatchNorm in training mode (batch statistics, Bessel's correction) and with fixed statistics.

Conventions (eps, the unbiased variance): backprop_ninja.conventions.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from backprop_ninja.conventions import BATCHNORM_EPS

# batchnorm, training mode: out = gain * (x - mean) / sqrt(var + eps) + bias
#
# x is (B, H), or (B, T, H) in the wavenet where every position of every example is one more
# sample of each feature: the statistics are then taken over dims (0, 1), as in makemore part 5.
# Below, (1, H) stands for (1, 1, H) with 3-D inputs, and (B, H) for (B, T, H).


def batchnorm_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions the statistics are taken over: the batch, and for 3-D inputs the positions too."""
    if x.ndim not in (2, 3):
        raise ValueError(f"BatchNorm1d takes (B, H) or (B, T, H) inputs, got shape {tuple(x.shape)}")
    return (0,) if x.ndim == 2 else (0, 1)


class BatchNormCache(NamedTuple):
    xhat: Tensor  # (B, H) the normalised input, the lecture's bnraw
    var_inv: Tensor  # (1, H) 1/sqrt(var + eps), the lecture's bnvar_inv
    gain: Tensor  # (H,) or (1, H), the lecture's bngain
    dims: tuple[int, ...]  # the dimensions the statistics were taken over


class BatchStats(NamedTuple):
    mean: Tensor  # (1, H)
    var: Tensor  # (1, H), unbiased


def batchnorm_forward(
    x: Tensor, gain: Tensor, bias: Tensor, eps: float = BATCHNORM_EPS
) -> tuple[Tensor, BatchNormCache, BatchStats]:
    """Normalise with this batch's statistics; returns them too, for running averages."""
    dims = batchnorm_dims(x)
    mean = x.mean(dims, keepdim=True)  # (1, H)
    var = x.var(dims, keepdim=True, unbiased=True)  # (1, H), Bessel's correction
    var_inv = (var + eps) ** -0.5  # (1, H)
    xhat = (x - mean) * var_inv  # (B, H)
    out = gain * xhat + bias  # (B, H)
    return out, BatchNormCache(xhat, var_inv, gain, dims), BatchStats(mean, var)


def batchnorm_backward(dout: Tensor, cache: BatchNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx, dgain, dbias: the fused backward of the lecture's Exercise 3.

    In the forward pass this was: out = gain * (x - mean) * (var + eps)**-0.5 + bias, with
    mean = x.sum(0)/n and var = ((x - mean)**2).sum(0)/(n-1), the sums over the statistics' dims
    (n = B, or B*T for 3-D inputs). Through the three paths by which x reaches the output
    (directly, through the mean, through the variance):

        dx = gain * var_inv / n * (n * dout - sum(dout) - n/(n-1) * xhat * sum(dout * xhat))

    The n/(n-1) is Bessel's correction coming back: with the biased variance it would be 1.
    """
    xhat, var_inv, gain, dims = cache
    n = xhat.numel() // var_inv.numel()  # elements per feature that the statistics averaged
    dbias = dout.sum(dims, keepdim=True)  # (1, H): bias was broadcast over the batch
    dgain = (xhat * dout).sum(dims, keepdim=True)  # (1, H): so was gain
    dx = gain * var_inv / n * (n * dout - dbias - n / (n - 1) * xhat * dgain)  # (B, H)
    return dx, dgain.reshape(gain.shape), dbias.reshape(gain.shape)


def batchnorm_inference(
    x: Tensor, gain: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float = BATCHNORM_EPS
) -> Tensor:
    """BatchNorm with fixed statistics (calibrated or running), as the lecture's split_loss."""
    return gain * (x - mean) * (var + eps) ** -0.5 + bias  # (B, H)
