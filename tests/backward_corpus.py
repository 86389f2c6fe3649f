"""A corpus of hand-written backward passes, correct and buggy, for check_backward and its benchmark.

Each Entry is an op: its fn (a torch.autograd.Function's apply, a (forward, backward) pair or a
module), a plain torch reference of the same forward pass, a factory make(shape, dtype) -> inputs,
the shapes to check at, and for a buggy one the class of its bug and words its diagnosis must
contain. Every buggy backward is the correct one with one slip. Imported by tests/test_check_backward.py
and benchmarks/gradcheck_compare.py (not collected by pytest: no test_ prefix).

Dimension letters: B batch, F fan-in, H fan-out (hidden), D features, T positions, d head width, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

SEED = 0


def _gen(shape, dtype) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + sum(shape) + len(shape) + (7 if dtype == torch.float64 else 0))


class Entry(NamedTuple):
    name: str
    fn: Any
    reference: Callable
    make: Callable  # make(shape, dtype) -> tuple of inputs
    shapes: list[tuple[int, ...]]
    bug: str | None = None  # the bug class; None for a correct op
    words: str | tuple[str, ...] = ()  # in the report's text where buggy (the diagnosis, or the finding)
    first: str | None = None  # the first wrong row or finding's input name, where it matters


# ---------------------------------------------------------------------------------------------
# linear: out = x @ W + b


def linear_inputs(shape, dtype):  # shape (B, F, H)
    B, Fi, H = shape
    g = _gen(shape, dtype)
    x = torch.randn(B, Fi, generator=g, dtype=dtype)  # (B, F)
    W = torch.randn(Fi, H, generator=g, dtype=dtype) / Fi ** 0.5  # (F, H)
    b = torch.randn(H, generator=g, dtype=dtype)  # (H,)
    return x, W, b


def linear_reference(x, W, b):
    return x @ W + b


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        return x @ W + b  # (B, H)

    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        # out = x @ W + b: dx = dout @ W.T, dW = x.T @ dout, b broadcast over the batch: a sum over dim 0
        return dout @ W.T, x.T @ dout, dout.sum(0)


class LinearTransposedW(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W.T, dout.T @ x, dout.sum(0)  # dW transposed: (H, F)


class LinearBiasDim(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W.T, x.T @ dout, dout.sum(1)  # summed over the wrong dimension


class LinearSign(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return -(dout @ W.T), x.T @ dout, dout.sum(0)  # sign flipped


class LinearHalf(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W.T, (x.T @ dout).half(), dout.sum(0)  # "half precision to save memory"


class LinearModule(torch.nn.Module):
    """A module with a custom Function inside: its parameters get rows too."""

    def __init__(self, function=Linear, F_in=5, H=4, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        self.function = function
        self.W = torch.nn.Parameter(torch.randn(F_in, H, generator=g, dtype=dtype) / F_in ** 0.5)  # (F, H)
        self.b = torch.nn.Parameter(torch.randn(H, generator=g, dtype=dtype))  # (H,)

    def forward(self, x):
        return self.function.apply(x, self.W, self.b)


class LinearSignW(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W.T, -(x.T @ dout), dout.sum(0)


# the cs231n pair: affine_forward(x, w, b) -> (out, cache), affine_backward(dout, cache) -> (dx, dw, db)
def affine_forward(x, w, b):
    out = x @ w + b  # (B, H)
    return out, (x, w)


def affine_backward(dout, cache):
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(0)


def affine_backward_bias_dim(dout, cache):
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(1)


# ---------------------------------------------------------------------------------------------
# normalisations


def norm_inputs(shape, dtype):  # shape (B, D)
    B, D = shape
    g = _gen(shape, dtype)
    x = 2 * torch.randn(B, D, generator=g, dtype=dtype) + 0.5  # (B, D)
    w = 1 + 0.1 * torch.randn(D, generator=g, dtype=dtype)  # (D,)
    b = 0.1 * torch.randn(D, generator=g, dtype=dtype)  # (D,)
    return x, w, b


EPS = 1e-5


def layernorm_reference(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        mean = x.mean(-1, keepdim=True)  # (B, 1)
        rstd = (x.var(-1, unbiased=False, keepdim=True) + EPS).rsqrt()  # (B, 1)
        xhat = (x - mean) * rstd  # (B, D)
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w + b

    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dxhat = dout * w  # (B, D)
        # xhat = (x - mean) * rstd: the two reductions of llm.c's layernorm backward
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.sum(0)


class LayerNormGainDim(LayerNorm):
    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(1), dout.sum(0)  # dw summed over the features


class LayerNormBiasMean(LayerNorm):
    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.mean(0)  # a mean where the forward broadcasts: 1/B too small


class LayerNormSizeOfBatch(LayerNorm):
    """A shape-dependent bug hidden at a square shape: the mean over the features divides by B."""

    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dxhat = dout * w
        n = dxhat.shape[0]  # should be shape[-1], the features
        dx = rstd * (dxhat - dxhat.sum(-1, keepdim=True) / n - xhat * (dxhat * xhat).sum(-1, keepdim=True) / n)
        return dx, (dout * xhat).sum(0), dout.sum(0)


def batchnorm_reference(x, w, b):
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=True, keepdim=True)  # Bessel's correction, as in the lectures
    return w * (x - mean) / (var + EPS).sqrt() + b


class BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        n = x.shape[0]
        mean = x.mean(0, keepdim=True)  # (1, D)
        var = ((x - mean) ** 2).sum(0, keepdim=True) / (n - 1)  # (1, D): Bessel's correction
        rstd = (var + EPS).rsqrt()  # (1, D)
        xhat = (x - mean) * rstd  # (B, D)
        ctx.save_for_backward(xhat, rstd, w)
        return w * xhat + b

    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        n = dout.shape[0]
        dxhat = dout * w  # (B, D)
        # the lecture's one-line batchnorm backward, with n/(n-1) from the unbiased variance
        dx = rstd / n * (n * dxhat - dxhat.sum(0) - n / (n - 1) * xhat * (dxhat * xhat).sum(0))
        return dx, (dout * xhat).sum(0), dout.sum(0)


class BatchNormBessel(BatchNorm):
    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        n = dout.shape[0]
        dxhat = dout * w
        dx = rstd / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))  # forgets n/(n-1)
        return dx, (dout * xhat).sum(0), dout.sum(0)


def variance_inputs(shape, dtype):  # (B, D)
    return (torch.randn(*shape, generator=_gen(shape, dtype), dtype=dtype),)


class Variance(torch.autograd.Function):
    """The unbiased variance over the batch, as BatchNorm's training statistics."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.var(0, unbiased=True)  # (D,)

    @staticmethod
    def backward(ctx, dvar):
        (x,) = ctx.saved_tensors
        n = x.shape[0]
        return 2 * (x - x.mean(0)) / (n - 1) * dvar


class VarianceBessel(Variance):
    @staticmethod
    def backward(ctx, dvar):
        (x,) = ctx.saved_tensors
        n = x.shape[0]
        return 2 * (x - x.mean(0)) / n * dvar  # 1/n where the forward divides by n-1


# ---------------------------------------------------------------------------------------------
# softmax and cross-entropy


def softmax_inputs(shape, dtype):  # (B, V)
    return (torch.randn(*shape, generator=_gen(shape, dtype), dtype=dtype),)


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)  # (B, V)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (dy - (dy * y).sum(-1, keepdim=True))


class SoftmaxInPlace(Softmax):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dy.mul_(y)  # the values come out right, the caller's upstream gradient does not
        return dy - y * dy.sum(-1, keepdim=True)


def ce_inputs(shape, dtype):  # (B, V)
    g = _gen(shape, dtype)
    logits = torch.randn(*shape, generator=g, dtype=dtype)  # (B, V)
    targets = torch.randint(0, shape[1], (shape[0],), generator=g)  # (B,) int64
    return logits, targets


def ce_reference(logits, targets):
    return F.cross_entropy(logits, targets)


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        probs = torch.softmax(logits, -1)  # (B, V)
        ctx.save_for_backward(probs, targets)
        return -probs[torch.arange(len(targets)), targets].log().mean()

    @staticmethod
    def backward(ctx, dloss):
        probs, targets = ctx.saved_tensors
        dlogits = probs.clone()
        dlogits[torch.arange(len(targets)), targets] -= 1
        return dlogits / len(targets) * dloss, None


class CrossEntropyNoMean(CrossEntropy):
    @staticmethod
    def backward(ctx, dloss):
        probs, targets = ctx.saved_tensors
        dlogits = probs.clone()
        dlogits[torch.arange(len(targets)), targets] -= 1
        return dlogits * dloss, None  # the loss is a mean: a missing 1/B


class CrossEntropyOneGradient(CrossEntropy):
    @staticmethod
    def backward(ctx, dloss):
        probs, targets = ctx.saved_tensors
        dlogits = probs.clone()
        dlogits[torch.arange(len(targets)), targets] -= 1
        return dlogits / len(targets) * dloss  # one gradient for two inputs


class CrossEntropyTargetGradient(CrossEntropy):
    @staticmethod
    def backward(ctx, dloss):
        probs, targets = ctx.saved_tensors
        dlogits = probs.clone()
        dlogits[torch.arange(len(targets)), targets] -= 1
        return dlogits / len(targets) * dloss, torch.zeros_like(targets, dtype=probs.dtype)


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

GELU_C = math.sqrt(2 / math.pi)


def gelu_reference(x):
    return F.gelu(x, approximate="tanh")


class GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(GELU_C * (x + 0.044715 * x ** 3)))

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        t = torch.tanh(GELU_C * (x + 0.044715 * x ** 3))  # (B, D)
        du = GELU_C * (1 + 3 * 0.044715 * x ** 2)  # du/dx
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)


class GELUTwice(GELU):
    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        t = torch.tanh(GELU_C * (x + 0.044715 * x ** 3))
        du = GELU_C * (1 + 3 * 0.044715 * x ** 2)
        return dout * ((1 + t) + x * (1 - t * t) * du)  # the 0.5 forgotten


# ---------------------------------------------------------------------------------------------
# attention with a causal mask: att = softmax(q k^T / sqrt(d) masked), out = att v


def attention_inputs(shape, dtype):  # (B, T, d)
    g = _gen(shape, dtype)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


def attention_reference(q, k, v):
    T, d = q.shape[-2], q.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf")).softmax(-1)
    return att @ v


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        T, d = q.shape[-2], q.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf")).softmax(-1)  # (B, T, T)
        ctx.save_for_backward(q, k, v, att)
        return att @ v  # (B, T, d)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, att = ctx.saved_tensors
        d = q.shape[-1]
        datt = dout @ v.transpose(-1, -2)  # (B, T, T)
        dv = att.transpose(-1, -2) @ dout  # (B, T, d)
        dscores = att * (datt - (datt * att).sum(-1, keepdim=True))  # softmax backward; masked entries have att 0
        return dscores @ k / math.sqrt(d), dscores.transpose(-1, -2) @ q / math.sqrt(d), dv


class AttentionUnscaledQ(Attention):
    @staticmethod
    def backward(ctx, dout):
        q, k, v, att = ctx.saved_tensors
        d = q.shape[-1]
        datt = dout @ v.transpose(-1, -2)
        dv = att.transpose(-1, -2) @ dout
        dscores = att * (datt - (datt * att).sum(-1, keepdim=True))
        return dscores @ k, dscores.transpose(-1, -2) @ q / math.sqrt(d), dv  # dq without 1/sqrt(d)


# ---------------------------------------------------------------------------------------------
# an RNN step: h_next = tanh(x @ Wx + h @ Wh + b), as cs231n's rnn_step_forward


def rnn_inputs(shape, dtype):  # (B, D, H)
    B, D, H = shape
    g = _gen(shape, dtype)
    x = torch.randn(B, D, generator=g, dtype=dtype)  # (B, D)
    h = torch.randn(B, H, generator=g, dtype=dtype)  # (B, H)
    Wx = torch.randn(D, H, generator=g, dtype=dtype) / D ** 0.5  # (D, H)
    Wh = torch.randn(H, H, generator=g, dtype=dtype) / H ** 0.5  # (H, H)
    b = torch.randn(H, generator=g, dtype=dtype)  # (H,)
    return x, h, Wx, Wh, b


def rnn_reference(x, h, Wx, Wh, b):
    return torch.tanh(x @ Wx + h @ Wh + b)


def rnn_step_forward(x, h, Wx, Wh, b):
    next_h = torch.tanh(x @ Wx + h @ Wh + b)  # (B, H)
    return next_h, (x, h, Wx, Wh, next_h)


def rnn_step_backward(dnext_h, cache):
    x, h, Wx, Wh, next_h = cache
    dt = dnext_h * (1 - next_h ** 2)  # (B, H): next_h = tanh(t)
    return dt @ Wx.T, dt @ Wh.T, x.T @ dt, h.T @ dt, dt.sum(0)


def rnn_step_backward_off_by_one(dnext_h, cache):
    """Loops over the examples, but one short."""
    x, h, Wx, Wh, next_h = cache
    dx, dh = torch.zeros_like(x), torch.zeros_like(h)
    dWx, dWh, db = torch.zeros_like(Wx), torch.zeros_like(Wh), torch.zeros(Wx.shape[1], dtype=x.dtype)
    for i in range(x.shape[0] - 1):
        dt = dnext_h[i] * (1 - next_h[i] ** 2)  # (H,)
        dx[i], dh[i] = Wx @ dt, Wh @ dt
        dWx += torch.outer(x[i], dt)
        dWh += torch.outer(h[i], dt)
        db += dt
    return dx, dh, dWx, dWh, db


# ---------------------------------------------------------------------------------------------
# an embedding with repeated indices: out = W[idx]


def embedding_inputs(shape, dtype):  # (B, T, V, E)
    B, T, V, E = shape
    g = _gen(shape, dtype)
    idx = torch.randint(0, V, (B, T), generator=g)  # (B, T): many repeats when B*T > V
    W = torch.randn(V, E, generator=g, dtype=dtype)  # (V, E)
    return idx, W


def embedding_reference(idx, W):
    return F.embedding(idx, W)


class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, W):
        ctx.save_for_backward(idx)
        ctx.V = W.shape[0]
        return W[idx]  # (B, T, E)

    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        dW = torch.zeros(ctx.V, dout.shape[-1], dtype=dout.dtype)  # (V, E)
        dW.index_add_(0, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))  # repeated rows add up
        return None, dW


class EmbeddingOverwrite(Embedding):
    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        dW = torch.zeros(ctx.V, dout.shape[-1], dtype=dout.dtype)
        dW[idx.reshape(-1)] = dout.reshape(-1, dout.shape[-1])  # = where += is needed
        return None, dW


# ---------------------------------------------------------------------------------------------
# two branches: a residual block and an add; an in-place tanh; dropout with a given mask


def residual_inputs(shape, dtype):  # (B, D)
    B, D = shape
    g = _gen(shape, dtype)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randn(D, D, generator=g, dtype=dtype) / D ** 0.5


def residual_reference(x, W):
    return x + torch.tanh(x @ W)


class Residual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W):
        t = torch.tanh(x @ W)  # (B, D)
        ctx.save_for_backward(x, W, t)
        return x + t

    @staticmethod
    def backward(ctx, dout):
        x, W, t = ctx.saved_tensors
        dpre = dout * (1 - t * t)  # (B, D)
        return dout + dpre @ W.T, x.T @ dpre  # out = x + t: x's direct branch, and its branch through t


class ResidualNoSkip(Residual):
    @staticmethod
    def backward(ctx, dout):
        x, W, t = ctx.saved_tensors
        dpre = dout * (1 - t * t)
        return dpre @ W.T, x.T @ dpre  # the skip branch forgotten


def add_inputs(shape, dtype):
    g = _gen(shape, dtype)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


def add_reference(x, y):
    return x * y + x


class MulAdd(torch.autograd.Function):
    """out = x * y + x."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y + x

    @staticmethod
    def backward(ctx, dout):
        x, y = ctx.saved_tensors
        dx = dout * y
        dx += dout
        return dx, dout * x


class MulAddShared(MulAdd):
    @staticmethod
    def backward(ctx, dout):
        x, y = ctx.saved_tensors
        buf = torch.empty_like(dout)  # one buffer for both gradients
        dx = torch.mul(dout, y + 1, out=buf)
        dy = torch.mul(dout, x, out=buf)  # overwrites dx
        return dx, dy


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        t = torch.tanh(x)  # (B, D)
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, dout):
        (t,) = ctx.saved_tensors
        return dout * (1 - t * t)


class TanhInPlace(Tanh):
    @staticmethod
    def forward(ctx, x):
        t = x.tanh_()  # saves a copy... of the input it has just overwritten
        ctx.save_for_backward(t)
        return t.clone()


def dropout_inputs(shape, dtype):
    g = _gen(shape, dtype)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.rand(*shape, generator=g) > 0.5  # bool mask


def dropout_reference(x, keep):
    return x * keep / 0.5


class Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x * keep / 0.5

    @staticmethod
    def backward(ctx, dout):
        (keep,) = ctx.saved_tensors
        return dout * keep / 0.5, None


class DropoutRedraws(Dropout):
    @staticmethod
    def backward(ctx, dout):
        keep = torch.rand(dout.shape) > 0.5  # draws a new mask: not the forward's
        return dout * keep / 0.5, None


# ---------------------------------------------------------------------------------------------
# the corpus

SQUARE_AND_NOT = [(3, 5, 4), (4, 4, 4)]


CORRECT = [
    Entry("linear", Linear.apply, linear_reference, linear_inputs, SQUARE_AND_NOT),
    Entry("affine pair", (affine_forward, affine_backward), linear_reference, linear_inputs, SQUARE_AND_NOT),
    Entry("layernorm", LayerNorm.apply, layernorm_reference, norm_inputs, [(3, 5), (4, 4)]),
    Entry("batchnorm", BatchNorm.apply, batchnorm_reference, norm_inputs, [(5, 3), (4, 4)]),
    Entry("variance", Variance.apply, lambda x: x.var(0), variance_inputs, [(5, 3), (4, 4)]),
    Entry("softmax", Softmax.apply, lambda x: x.softmax(-1), softmax_inputs, [(3, 7), (4, 4)]),
    Entry("cross-entropy", CrossEntropy.apply, ce_reference, ce_inputs, [(5, 7), (4, 4)]),
    Entry("gelu", GELU.apply, gelu_reference, softmax_inputs, [(3, 5), (4, 4)]),
    Entry("attention", Attention.apply, attention_reference, attention_inputs, [(2, 5, 8), (2, 4, 4)]),
    Entry("rnn step pair", (rnn_step_forward, rnn_step_backward), rnn_reference, rnn_inputs, [(3, 5, 4), (4, 4, 4)]),
    Entry("embedding", Embedding.apply, embedding_reference, embedding_inputs, [(3, 4, 6, 5), (2, 3, 3, 3)]),
    Entry("residual", Residual.apply, residual_reference, residual_inputs, [(3, 5), (4, 4)]),
    Entry("mul-add", MulAdd.apply, add_reference, add_inputs, [(3, 5), (4, 4)]),
    Entry("tanh", Tanh.apply, torch.tanh, softmax_inputs, [(3, 5), (4, 4)]),
    Entry("dropout", Dropout.apply, dropout_reference, dropout_inputs, [(3, 5), (4, 4)]),
]

BUGGY = [
    Entry("linear: dW transposed", LinearTransposedW.apply, linear_reference, linear_inputs, SQUARE_AND_NOT,
          "transpose", "transpose of the right gradient", "W"),
    Entry("linear: db over the wrong dim", LinearBiasDim.apply, linear_reference, linear_inputs, SQUARE_AND_NOT,
          "wrong reduction dim", "a sum over the wrong dimension", "b"),
    Entry("affine pair: db over the wrong dim", (affine_forward, affine_backward_bias_dim), linear_reference,
          linear_inputs, SQUARE_AND_NOT, "wrong reduction dim", "a sum over the wrong dimension", "b"),
    Entry("linear: dx sign", LinearSign.apply, linear_reference, linear_inputs, SQUARE_AND_NOT,
          "sign flip", "sign flipped", "x"),
    Entry("linear: dW in float16", LinearHalf.apply, linear_reference, linear_inputs, SQUARE_AND_NOT,
          "dtype", "dW is float16", "W"),
    Entry("layernorm: dw over the features", LayerNormGainDim.apply, layernorm_reference, norm_inputs,
          [(3, 5), (6, 4)], "wrong reduction dim", "a sum over the wrong dimension", "w"),
    Entry("layernorm: db a mean", LayerNormBiasMean.apply, layernorm_reference, norm_inputs, [(3, 5), (6, 5)],
          "constant factor 1/n", "times too small: a 1/n too many", "b"),
    Entry("layernorm: size of the batch for the features", LayerNormSizeOfBatch.apply, layernorm_reference,
          norm_inputs, [(4, 4), (3, 5)], "shape-dependent", "right at the square shape", "x"),
    Entry("variance: Bessel slip", VarianceBessel.apply, lambda x: x.var(0), variance_inputs, [(5, 3), (7, 3)],
          "constant factor (n-1)/n", "Bessel's correction", "x"),
    Entry("batchnorm: Bessel slip at batch 1024", BatchNormBessel.apply, batchnorm_reference, norm_inputs,
          [(1024, 3)], "Bessel slip", "with n = 1024, a 1/n where the forward pass divides by n-1", "x"),
    Entry("softmax: upstream changed in place", SoftmaxInPlace.apply, lambda x: x.softmax(-1), softmax_inputs,
          [(3, 7), (4, 4)], "input modified in place", "changed the upstream gradient (grad_output) in place"),
    Entry("cross-entropy: no 1/B", CrossEntropyNoMean.apply, ce_reference, ce_inputs, [(5, 7), (3, 7)],
          "constant factor n", "times too large: a missing 1/n", "logits"),
    Entry("cross-entropy: one gradient", CrossEntropyOneGradient.apply, ce_reference, ce_inputs, [(5, 7), (3, 7)],
          "wrong number of gradients", "returned 1 gradient for 2 inputs"),
    Entry("cross-entropy: a gradient for the targets", CrossEntropyTargetGradient.apply, ce_reference, ce_inputs,
          [(5, 7), (3, 7)], "gradient for an integer input", "a gradient for targets, a torch.int64 tensor",
          "targets"),
    Entry("gelu: 0.5 forgotten", GELUTwice.apply, gelu_reference, softmax_inputs, [(3, 5), (5, 7)],
          "constant factor 2", "twice the right value", "x"),
    Entry("attention: dq without 1/sqrt(d)", AttentionUnscaledQ.apply, attention_reference, attention_inputs,
          [(2, 5, 8), (3, 5, 8)], "constant factor sqrt(d)", "sqrt(d) = 2.828 times too large", "q"),
    Entry("rnn step pair: one example short", (rnn_step_forward, rnn_step_backward_off_by_one), rnn_reference,
          rnn_inputs, [(3, 5, 4), (4, 4, 4)], "right only in part", "right but for 1 of its", "x"),
    Entry("embedding: = where += is needed", EmbeddingOverwrite.apply, embedding_reference, embedding_inputs,
          [(3, 4, 6, 5), (2, 3, 3, 3)], "right only in part", "repeated indices must add up", "W"),
    Entry("residual: skip branch forgotten", ResidualNoSkip.apply, residual_reference, residual_inputs,
          [(3, 5), (4, 4)], "missing branch", "lacks the term dout", "x"),
    Entry("mul-add: dx and dy share memory", MulAddShared.apply, add_reference, add_inputs, [(3, 5), (4, 4)],
          "shared memory", "share memory"),
    Entry("tanh: input changed in place", TanhInPlace.apply, torch.tanh, softmax_inputs, [(3, 5), (4, 4)],
          "input modified in place", "the forward pass changed x in place", "x"),
    Entry("dropout: mask redrawn in backward", DropoutRedraws.apply, dropout_reference, dropout_inputs,
          [(3, 5), (4, 4)], "nondeterminism", "not deterministic"),
]
