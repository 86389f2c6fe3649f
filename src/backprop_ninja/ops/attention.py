"""Causal self-attention in pieces, and the softmax it uses. Conventions: backprop_ninja.conventions.

nh is the number of heads and hs = E / nh the head size (conventions.py). In att (B, nh, T, T) the
first T is the query position t, the second the key position s.

makemore's CausalSelfAttention.forward, and the op below that does each part:

    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)                     ops.linear, then
    k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)          split_heads
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))      causal_attention
    att = F.softmax(att, dim=-1)                                               (softmax)
    y = att @ v
    y = y.transpose(1, 2).contiguous().view(B, T, C)                         merge_heads
    y = self.c_proj(y)                                                       ops.linear
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# softmax over the last dim: out = exp(x - max) / sum(exp(x - max))


class SoftmaxCache(NamedTuple):
    out: Tensor  # (..., T) the probabilities: the backward needs nothing else


def softmax_forward(x: Tensor) -> tuple[Tensor, SoftmaxCache]:
    """Softmax over the last dim, finite at any finite logits: the row's max is subtracted first, so
    that exp never sees more than 0 (exp overflows float32 from 89, float64 from 710). Entries of
    -inf (masked) get exactly 0. A row of only -inf has no max to subtract and gives nan, as
    F.softmax does: causal attention never makes one, each row keeps its diagonal.
    """
    shifted = x - x.amax(-1, keepdim=True)  # (..., T) at most 0
    e = shifted.exp()  # (..., T) in [0, 1], 1 at the max
    out = e / e.sum(-1, keepdim=True)  # (..., T)
    return out, SoftmaxCache(out)


def softmax_backward(dout: Tensor, cache: SoftmaxCache) -> Tensor:
    """Returns dx. In the forward pass this was: out = exp(x - max) / sum(exp(x - max)).

    The max is a constant shift, to which softmax is blind: no gradient goes through it. Each row's
    Jacobian is d out_i / d x_j = out_i * (delta_ij - out_j), so

        dx_i = out_i * dout_i  -  out_i * sum_j(dout_j * out_j)
               the i = j term     through the normalising sum
    """
    out = cache.out
    return out * (dout - (dout * out).sum(-1, keepdim=True))  # (..., T)


# ---------------------------------------------------------------------------------------------
# split heads: the fused c_attn output (B, T, 3E) -> q, k, v, each (B, nh, T, hs)


class SplitHeadsCache(NamedTuple):
    qkv_shape: torch.Size  # (B, T, 3E)


def split_heads_forward(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor, SplitHeadsCache]:
    """qkv (B, T, 3E) -> q, k, v, each (B, nh, T, hs) with hs = E / nh, and the cache.

    Views, as makemore's: q, k, v = qkv.split(E, dim=2); q = q.view(B, T, nh, hs).transpose(1, 2).
    """
    if qkv.ndim != 3 or n_head < 1 or qkv.shape[2] % (3 * n_head):
        raise ValueError(f"split_heads takes a (B, T, 3E) qkv with E a multiple of n_head, "
                         f"got shape {tuple(qkv.shape)} and n_head {n_head}")
    B, T, three_e = qkv.shape
    E = three_e // 3
    hs = E // n_head
    q, k, v = qkv.split(E, dim=2)  # (B, T, E) each
    q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    return q, k, v, SplitHeadsCache(qkv.shape)


def split_heads_backward(dq: Tensor, dk: Tensor, dv: Tensor, cache: SplitHeadsCache) -> Tensor:
    """Returns dqkv. In the forward pass this was: q, k, v = qkv.split(E, dim=2), each then
    .view(B, T, nh, hs).transpose(1, 2). Views move no numbers: each gradient goes back to
    (B, T, E), the heads side by side, and the three are concatenated in q, k, v order.
    """
    B, T, three_e = cache.qkv_shape
    parts = [d.transpose(1, 2).reshape(B, T, three_e // 3) for d in (dq, dk, dv)]  # (B, T, E) each
    return torch.cat(parts, dim=2)  # (B, T, 3E)


# ---------------------------------------------------------------------------------------------
# causal attention: y = softmax(masked(q @ k^T / sqrt(hs))) @ v, every head at once


class CausalAttentionCache(NamedTuple):
    q: Tensor  # (B, nh, T, hs)
    k: Tensor  # (B, nh, T, hs)
    v: Tensor  # (B, nh, T, hs)
    att: Tensor | None  # (B, nh, T, T) the attention weights; None with recompute=True: rebuilt from q, k


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    """(T, T) bool, True where key s comes after query t (s > t): the future, which t may not read.

    makemore's `self.bias[:, :, :T, :T] == 0`, with bias = tril(ones(T, T)).
    """
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)  # (T, T)


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """att (B, nh, T, T): the scaled scores, the future masked with -inf, a softmax over the keys."""
    T, hs = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    scores = scores.masked_fill(causal_mask(T, q.device), float("-inf"))  # (B, nh, T, T)
    att, _ = softmax_forward(scores)  # (B, nh, T, T) 0 at the future
    return att


def causal_attention_forward(q: Tensor, k: Tensor, v: Tensor,
                             recompute: bool = False) -> tuple[Tensor, CausalAttentionCache]:
    """q, k, v (B, nh, T, hs) -> y (B, nh, T, hs), y[t] the att-weighted mean of v[0..t].

    The cache keeps att, (B, nh, T, T): nh*T*T numbers an example, more than q, k and v together
    once T > 3*hs. With recompute=True it keeps only q, k, v and the backward rebuilds att from
    them (one more q @ k^T and softmax): by the same code on the same numbers, so bit for bit the
    same att, and the same gradients.
    """
    att = attention_weights(q, k)  # (B, nh, T, T)
    y = att @ v  # (B, nh, T, hs)
    return y, CausalAttentionCache(q, k, v, None if recompute else att)


def causal_attention_backward(dy: Tensor, cache: CausalAttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv. In the forward pass this was, line by line (attention_weights, then att @ v):
    scores = (q @ k^T) / sqrt(hs); scores = masked_fill(future, -inf); att = softmax(scores); y = att @ v.
    """
    q, k, v, att = cache
    if att is None:
        att = attention_weights(q, k)  # (B, nh, T, T) recomputed, as in the forward
    T, hs = q.shape[-2], q.shape[-1]
    # In the forward pass this was: y = att @ v
    datt = dy @ v.transpose(-2, -1)  # (B, nh, T, T)
    dv = att.transpose(-2, -1) @ dy  # (B, nh, T, hs)
    # In the forward pass this was: att = F.softmax(scores, dim=-1)
    dscores = softmax_backward(datt, SoftmaxCache(att))  # (B, nh, T, T)
    # In the forward pass this was: scores = scores.masked_fill(future, -inf): the filled entries
    # read neither q nor k. (att is exactly 0 there already; the fill makes them +0, not -0.)
    dscores = dscores.masked_fill(causal_mask(T, q.device), 0.0)  # (B, nh, T, T)
    # In the forward pass this was: scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
    dscores = dscores * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    dq = dscores @ k  # (B, nh, T, hs)
    dk = (q.transpose(-2, -1) @ dscores).transpose(-2, -1)  # (B, nh, T, hs): d(k^T) = q^T @ dscores
    return dq, dk, dv


def attention_entropy(att: Tensor) -> Tensor:
    """att (B, nh, T, T) -> (nh,): each head's mean, over the batch and the query positions, of the
    entropy -sum_s att log att of its rows, in nats, with 0 log 0 = 0 (the masked future).

    A diagnostic: row t is at most log(t+1), a head that averages the past uniformly; 0 for a head
    that reads a single position.
    """
    row_entropy = -torch.special.xlogy(att, att).sum(-1)  # (B, nh, T)
    return row_entropy.mean(dim=(0, 2))  # (nh,)


# ---------------------------------------------------------------------------------------------
# merge heads: y (B, nh, T, hs) -> (B, T, nh*hs), the heads side by side again


class MergeHeadsCache(NamedTuple):
    n_head: int  # nh, to split the (B, T, E) gradient back into heads


def merge_heads_forward(y: Tensor) -> tuple[Tensor, MergeHeadsCache]:
    """y (B, nh, T, hs) -> (B, T, E), E = nh*hs: makemore's y.transpose(1, 2).contiguous().view(B, T, C)."""
    B, n_head, T, hs = y.shape
    out = y.transpose(1, 2).contiguous().view(B, T, n_head * hs)  # (B, T, E)
    return out, MergeHeadsCache(n_head)


def merge_heads_backward(dout: Tensor, cache: MergeHeadsCache) -> Tensor:
    """Returns dy. In the forward pass this was: out = y.transpose(1, 2).contiguous().view(B, T, E).
    A copy and views move no numbers: the gradient is dout seen the other way round.
    """
    B, T, E = dout.shape
    return dout.reshape(B, T, cache.n_head, E // cache.n_head).transpose(1, 2)  # (B, nh, T, hs)
