"""Forward/backward pairs of every op the models use, written by hand at tensor level.

Each op is two free functions side by side, as in cs231n's layers.py:

    out, cache = op_forward(inputs...)
    dinputs... = op_backward(dout, cache)

Gradients come back in the order of the forward's inputs. Caches are small named tuples.

Gradient policy (the whole library follows it): every backward returns *fresh* tensors and never
accumulates into anything. Where a tensor feeds two branches, the caller sums the two gradients.

Dimension letters in the shape comments: B batch, T positions (time), E embedding width,
F fan-in, H hidden width (fan-out), V vocabulary size, V' any feature width.

Conventions pinned here for all models:
- Linear weights are (fan_in, fan_out), as in the lectures: out = x @ W + b.
- BatchNorm in training mode normalises with the batch mean and the *unbiased* batch variance
  (Bessel's correction, 1/(n-1)), eps = 1e-5, exactly as the lectures' BatchNorm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BATCHNORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# embedding: emb = C[X]


class EmbeddingCache(NamedTuple):
    idx: Tensor  # (B, T) int64 token ids that were looked up
    num_embeddings: int  # V, rows of the table


def embedding_forward(idx: Tensor, table: Tensor) -> tuple[Tensor, EmbeddingCache]:
    out = table[idx]  # (B, T, E)
    return out, EmbeddingCache(idx, table.shape[0])


def embedding_backward(dout: Tensor, cache: EmbeddingCache) -> Tensor:
    """Returns dtable. In the forward pass this was: emb = C[X].

    Every row of C that was looked up k times receives the sum of those k gradients:
    a scatter-add, vectorised with index_add_ (no Python loop over the batch).
    """
    width = dout.shape[-1]
    dtable = dout.new_zeros(cache.num_embeddings, width)  # (V, E)
    dtable.index_add_(0, cache.idx.reshape(-1), dout.reshape(-1, width))  # (V, E)
    return dtable


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# cross-entropy: loss = -mean(log softmax(logits)[i, Y[i]])


class CrossEntropyCache(NamedTuple):
    probs: Tensor  # (B, V) softmax of the logits
    targets: Tensor  # (B,) int64 correct classes


def cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, CrossEntropyCache]:
    loss = F.cross_entropy(logits, targets)  # () stable: log-sum-exp with the max subtracted
    probs = F.softmax(logits, dim=1)  # (B, V)
    return loss, CrossEntropyCache(probs, targets)


def cross_entropy_backward(cache: CrossEntropyCache) -> Tensor:
    """Returns dlogits (the loss is the end of the graph: dloss = 1). The lecture's Exercise 2.

    In the forward pass this was: loss = -log(softmax(logits)[i, Y[i]]).mean(). Per row,
    dloss/dlogits = softmax(logits) - one_hot(Y): the probabilities, minus 1 at the correct
    class; the mean over the n rows divides by n.
    """
    probs, targets = cache
    n = probs.shape[0]
    dlogits = probs.clone()  # (B, V)
    dlogits[torch.arange(n, device=probs.device), targets] -= 1
    dlogits /= n
    return dlogits
