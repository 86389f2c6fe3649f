"""Fused forms of the transformer's op pairs: the maths of ops.layernorm, ops.gelu and ops.attention
in fewer passes over memory, in torch. Conventions: backprop_ninja.conventions. nn.transformer_layers
runs them through ops.native_transformer wherever its C kernels do not apply (float64, CUDA, the
autograd reference passes, no compiler).

On this machine a fresh (B, T, 4E) temporary costs more than the arithmetic on it, and each op
call costs microseconds (docs/speed.md, "the transformer"): these update fresh tensors in place,
and take the forward values of softmax and LayerNorm from torch's fused kernels (as
ops.sequence_loss takes its own from F.cross_entropy). Every backward is still ours, and each one
is the readable op of its module term for term, its comments quoting that op's lines;
tests/test_transformer.py holds each to its op and to autograd through the verdict. A fused
backward never writes into its dout or its cache (a Residual reads dout again, and `check --model`
reads both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.ops.attention import (
    CausalAttentionCache, MergeHeadsCache, SplitHeadsCache, causal_mask, merge_heads_backward, merge_heads_forward,
    split_heads_forward,
)
from backprop_ninja.ops.gelu import GELU_BETA, GELU_KAPPA, GELUCache
from backprop_ninja.ops.layernorm import LAYERNORM_EPS, LayerNormCache


def fused_layernorm_forward(x: Tensor, weight: Tensor, bias: Tensor,
                            eps: float = LAYERNORM_EPS) -> tuple[Tensor, LayerNormCache]:
    """ops.layernorm_forward: out = (x - mean) * rstd * weight + bias, the biased variance, nn.LayerNorm's eps.

    The forward values are torch's one fused kernel (out, mean, rstd); xhat, which the hand-written
    backward (ops.layernorm_backward) reads, is rebuilt from them in two passes: six fewer than the op's.
    """
    out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # (..., E), (..., 1), (..., 1)
    xhat = (x - mean).mul_(rstd)  # (..., E) xhat = (x - mean) * rstd
    return out, LayerNormCache(xhat, rstd, weight)


def fused_gelu_forward(x: Tensor) -> tuple[Tensor, GELUCache]:
    """ops.gelu_forward: out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))."""
    beta, kappa = GELU_BETA, GELU_KAPPA
    tanh_inner = x * x  # (..., H) x**2, then in place:
    tanh_inner.mul_(beta * kappa).add_(beta).mul_(x).tanh_()  # tanh(beta * (x + kappa * x**3))
    out = torch.addcmul(x, x, tanh_inner).mul_(0.5)  # (..., H) 0.5 * (x + x * tanh_inner)
    return out, GELUCache(x, tanh_inner)


def fused_gelu_backward(dout: Tensor, cache: GELUCache) -> Tensor:
    """ops.gelu_backward: dout/dx = 0.5 * (1 + tanh(inner))                          left's derivative
                                  + 0.5 * x * (1 - tanh(inner)**2) * inner'(x)     right's derivative
    with inner'(x) = sqrt(2/pi) * (1 + 3 * 0.044715 * x**2)."""
    beta, kappa = GELU_BETA, GELU_KAPPA
    x, tanh_inner = cache
    dx = x * x  # (..., H) x**2, then in place:
    dx.mul_(1.5 * beta * kappa).add_(0.5 * beta).mul_(x)  # left * inner'(x) = 0.5 x beta (1 + 3 kappa x**2)
    dx.addcmul_(dx, tanh_inner * tanh_inner, value=-1)  # right's derivative: times (1 - tanh(inner)**2)
    dx.add_(tanh_inner, alpha=0.5).add_(0.5)  # + left's derivative 0.5 * (1 + tanh(inner))
    return dx.mul_(dout)  # (..., H)


class AttentionCache(NamedTuple):
    """fused_heads_forward's: the three ops' caches."""

    split: SplitHeadsCache
    attention: CausalAttentionCache
    merge: MergeHeadsCache

    @property
    def att(self) -> Tensor | None:
        """The attention weights (B, nh, T, T) kept, or None (recompute), as native_transformer.HeadsCache.att."""
        return self.attention.att


def fused_heads_forward(qkv: Tensor, n_head: int, recompute: bool = False) -> tuple[Tensor, AttentionCache]:
    """The heads between makemore's two Linears: qkv (B, T, 3E) -> split_heads -> causal attention ->
    merge_heads -> y (B, T, E)."""
    q, k, v, split = split_heads_contiguous(qkv, n_head)  # (B, nh, T, hs) each
    y, attention = fused_attention_forward(q, k, v, recompute=recompute)  # (B, nh, T, hs)
    out, merge = merge_heads_forward(y)  # (B, T, E)
    return out, AttentionCache(split, attention, merge)


def split_heads_contiguous(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor, SplitHeadsCache]:
    """ops.split_heads_forward, with q, k, v copied once into their own memory: each is read by two
    products in the forward and two in the backward, and a product of a strided view copies it first,
    every time."""
    q, k, v, split = split_heads_forward(qkv, n_head)  # (B, nh, T, hs) each, views
    return q.contiguous(), k.contiguous(), v.contiguous(), split  # (B, nh, T, hs) each


def fused_heads_backward(dout: Tensor, cache: AttentionCache) -> Tensor:
    """dqkv (B, T, 3E) from dout (B, T, E)."""
    split, attention, merge = cache
    # In the forward pass this was: out = merge_heads(y)
    dy = merge_heads_backward(dout, merge).contiguous()  # (B, nh, T, hs), once: two products read it
    # In the forward pass this was: y = softmax(masked(q @ k^T / sqrt(hs))) @ v
    dq, dk, dv = fused_attention_backward(dy, attention)  # (B, nh, T, hs) each
    # In the forward pass this was: q, k, v = split_heads(qkv)
    return fused_split_heads_backward(dq, dk, dv, split)  # (B, T, 3E)


def fused_attention_forward(q: Tensor, k: Tensor, v: Tensor,
                            recompute: bool = False) -> tuple[Tensor, CausalAttentionCache]:
    """ops.causal_attention_forward: y = softmax(masked(q @ k^T / sqrt(hs))) @ v, in place where it can be."""
    att = fused_attention_weights(q, k)  # (B, nh, T, T)
    y = att @ v  # (B, nh, T, hs)
    return y, CausalAttentionCache(q, k, v, None if recompute else att)


def fused_attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """ops.attention_weights: the scaled scores, the future masked with -inf, a softmax over the keys.

    The forward value of the softmax is torch's one fused kernel (as ops.sequence_loss takes its
    forward values from F.cross_entropy); its backward is ours, fused_attention_backward. The same
    probabilities as ops.softmax_forward to rounding (torch subtracts the row max too).
    """
    T, hs = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(hs))  # (B, nh, T, T)
    scores.masked_fill_(causal_mask(T, q.device), float("-inf"))  # the future
    return torch.softmax(scores, dim=-1)  # (B, nh, T, T) 0 at the future


def fused_attention_backward(dy: Tensor, cache: CausalAttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    """ops.causal_attention_backward, its softmax backward in place on datt * att."""
    q, k, v, att = cache
    if att is None:
        att = fused_attention_weights(q, k)  # (B, nh, T, T) recomputed, as in the forward
    T, hs = q.shape[-2], q.shape[-1]
    # In the forward pass this was: y = att @ v
    datt = dy @ v.transpose(-2, -1)  # (B, nh, T, T)
    dv = att.transpose(-2, -1) @ dy  # (B, nh, T, hs)
    # In the forward pass this was: att = softmax(scores)
    dscores = fused_softmax_backward(datt, att)  # (B, nh, T, T)
    # In the forward pass this was: scores = masked_fill(future, -inf): no gradient there (+0, not -0)
    dscores.masked_fill_(causal_mask(T, q.device), 0.0)
    # In the forward pass this was: scores = (q @ k^T) * (1 / sqrt(hs))
    dscores.mul_(1.0 / math.sqrt(hs))
    dq = dscores @ k  # (B, nh, T, hs)
    dk = dscores.transpose(-2, -1) @ q  # (B, nh, T, hs): d(k^T) = q^T @ dscores, transposed
    return dq, dk, dv


def fused_softmax_backward(dout: Tensor, out: Tensor) -> Tensor:
    """ops.softmax_backward: dx_i = out_i * dout_i - out_i * sum_j(dout_j * out_j), in place on a
    fresh dout * out. Writes into `dout`: the caller passes its own fresh datt."""
    dx = dout.mul_(out)  # (..., T) the i = j term, out_i * dout_i
    return dx.addcmul_(out, dx.sum(-1, keepdim=True), value=-1)  # (..., T) - out_i * sum_j(dout_j * out_j)


def fused_split_heads_backward(dq: Tensor, dk: Tensor, dv: Tensor, cache: SplitHeadsCache) -> Tensor:
    """ops.split_heads_backward: each of dq, dk, dv (B, nh, T, hs) back to (B, T, E), side by side in
    q, k, v order, copied once into one (B, T, 3E) tensor (no cat)."""
    B, T, three_e = cache.qkv_shape
    n_head, hs = dq.shape[1], dq.shape[3]
    dqkv = dq.new_empty(B, T, 3, n_head, hs)  # (B, T, 3, nh, hs)
    for i, d in enumerate((dq, dk, dv)):
        dqkv[:, :, i].copy_(d.transpose(1, 2))  # (B, T, nh, hs)
    return dqkv.view(B, T, three_e)  # (B, T, 3E)
