"""Layers of the transformer (makemore's GPT): each over (B, T, E) activations, with the ops' backwards.

    LayerNorm            each position's E features normalised on their own (ops.layernorm)
    GELU                 the tanh approximation (ops.gelu)
    CausalSelfAttention  the fused qkv (B, T, 3E) -> heads -> causal attention -> merged heads (B, T, E)
    Dropout              inverted dropout from a seeded generator of its own; the identity in eval mode
    Branch               a Sequential that keeps its layers' outputs and their gradients (for check rows)
    Block                the pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))

The qkv and output projections are plain `Linear`s around CausalSelfAttention, as makemore's c_attn
and c_proj, so a block is

    Block(Residual(Branch([LayerNorm, Linear(E, 3E), CausalSelfAttention, Linear(E, E)])),
          Residual(Branch([LayerNorm, Linear(E, 4E), GELU, Linear(4E, E)])))

and every intermediate has a name: after a backward pass Block.inner_grads() holds d loss / d (each
sub-layer's output), keyed as Block.inner_outputs(), so `check --model transformer` prints a row per
intermediate of every block ("L2 Block ln_1", "L2 Block att", ...) and a bug shows where it enters.

Speed. GELU, the attention and LayerNorm's forward run the ops' maths in fewer passes over
memory (`fused_*` below: in-place updates of fresh tensors; the forward values of softmax and
LayerNorm from torch's fused kernels, as ops.sequence_loss takes its own from F.cross_entropy):
on this machine a fresh (B, T, 4E) temporary costs more than the arithmetic on it, and each op
call costs microseconds (docs/speed.md, "the transformer"). Every backward is ours, and each fused
one is the readable op of `ops` (ops.gelu, ops.attention) term for term, its comments quoting that
op's lines; LayerNorm's backward is ops.layernorm_backward itself; tests/test_transformer.py holds each to its op and to
autograd through the verdict. A fused backward never writes into its dout or its cache (a Residual
reads dout again, and `check --model` reads both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.ops.gelu import GELU_BETA, GELU_KAPPA
from backprop_ninja.nn.containers import Residual, Sequential
from backprop_ninja.nn.layers import Layer


# ---------------------------------------------------------------------------------------------
# the fused op pairs: the ops' maths, fewer fresh tensors


def fused_layernorm_forward(x: Tensor, weight: Tensor, bias: Tensor,
                            eps: float = ops.LAYERNORM_EPS) -> tuple[Tensor, ops.LayerNormCache]:
    """ops.layernorm_forward: out = (x - mean) * rstd * weight + bias, the biased variance, nn.LayerNorm's eps.

    The forward values are torch's one fused kernel (out, mean, rstd); xhat, which the hand-written
    backward (ops.layernorm_backward) reads, is rebuilt from them in two passes: six fewer than the op's.
    """
    out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # (..., E), (..., 1), (..., 1)
    xhat = (x - mean).mul_(rstd)  # (..., E) xhat = (x - mean) * rstd
    return out, ops.LayerNormCache(xhat, rstd, weight)


def fused_gelu_forward(x: Tensor) -> tuple[Tensor, ops.GELUCache]:
    """ops.gelu_forward: out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))."""
    beta, kappa = GELU_BETA, GELU_KAPPA
    tanh_inner = x * x  # (..., H) x**2, then in place:
    tanh_inner.mul_(beta * kappa).add_(beta).mul_(x).tanh_()  # tanh(beta * (x + kappa * x**3))
    out = torch.addcmul(x, x, tanh_inner).mul_(0.5)  # (..., H) 0.5 * (x + x * tanh_inner)
    return out, ops.GELUCache(x, tanh_inner)


def fused_gelu_backward(dout: Tensor, cache: ops.GELUCache) -> Tensor:
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


def fused_attention_forward(q: Tensor, k: Tensor, v: Tensor,
                            recompute: bool = False) -> tuple[Tensor, ops.CausalAttentionCache]:
    """ops.causal_attention_forward: y = softmax(masked(q @ k^T / sqrt(hs))) @ v, in place where it can be."""
    att = fused_attention_weights(q, k)  # (B, nh, T, T)
    y = att @ v  # (B, nh, T, hs)
    return y, ops.CausalAttentionCache(q, k, v, None if recompute else att)


def fused_attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """ops.attention_weights: the scaled scores, the future masked with -inf, a softmax over the keys.

    The forward value of the softmax is torch's one fused kernel (as ops.sequence_loss takes its
    forward values from F.cross_entropy); its backward is ours, fused_attention_backward. The same
    probabilities as ops.softmax_forward to rounding (torch subtracts the row max too).
    """
    T, hs = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(hs))  # (B, nh, T, T)
    scores.masked_fill_(ops.causal_mask(T, q.device), float("-inf"))  # the future
    return torch.softmax(scores, dim=-1)  # (B, nh, T, T) 0 at the future


def fused_attention_backward(dy: Tensor, cache: ops.CausalAttentionCache) -> tuple[Tensor, Tensor, Tensor]:
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
    dscores.masked_fill_(ops.causal_mask(T, q.device), 0.0)
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


def fused_split_heads_backward(dq: Tensor, dk: Tensor, dv: Tensor, cache: ops.SplitHeadsCache) -> Tensor:
    """ops.split_heads_backward: each of dq, dk, dv (B, nh, T, hs) back to (B, T, E), side by side in
    q, k, v order, copied once into one (B, T, 3E) tensor (no cat)."""
    B, T, three_e = cache.qkv_shape
    n_head, hs = dq.shape[1], dq.shape[3]
    dqkv = dq.new_empty(B, T, 3, n_head, hs)  # (B, T, 3, nh, hs)
    for i, d in enumerate((dq, dk, dv)):
        dqkv[:, :, i].copy_(d.transpose(1, 2))  # (B, T, nh, hs)
    return dqkv.view(B, T, three_e)  # (B, T, 3E)


class LayerNorm(Layer):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim: (..., E) -> (..., E)."""

    def __init__(self, weight: Tensor, bias: Tensor, names: tuple[str, str] = ("weight", "bias")) -> None:
        super().__init__()
        self.w_name, self.b_name = names
        self.params = {self.w_name: weight, self.b_name: bias}

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = fused_layernorm_forward(x, self.params[self.w_name], self.params[self.b_name])  # (..., E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        dx, dweight, dbias = ops.layernorm_backward(dout, self.cache)  # (..., E), (E,), (E,)
        self.grads = {self.w_name: dweight, self.b_name: dbias}
        return dx


class GELU(Layer):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3))): (..., H) -> (..., H)."""

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = fused_gelu_forward(x)  # (..., H)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return fused_gelu_backward(dout, self.cache)  # (..., H)

    def __repr__(self) -> str:
        return "GELU()"


class AttentionCache(NamedTuple):
    split: ops.SplitHeadsCache
    attention: ops.CausalAttentionCache
    merge: ops.MergeHeadsCache


class CausalSelfAttention(Layer):
    """The heads of makemore's CausalSelfAttention between its two Linears: qkv (B, T, 3E) -> y (B, T, E).

    recompute=True keeps q, k, v but not the (B, nh, T, T) attention weights: the backward rebuilds
    them (ops.causal_attention_forward), bit for bit the same gradients for less memory.
    """

    def __init__(self, n_head: int, recompute: bool = False) -> None:
        super().__init__()
        self.n_head, self.recompute = n_head, recompute

    def forward(self, qkv: Tensor) -> Tensor:
        q, k, v, split = ops.split_heads_forward(qkv, self.n_head)  # (B, nh, T, hs) each, views
        # copied once into their own memory: each is read by two products here and two in the backward,
        # and a product of a strided view copies it first, every time
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # (B, nh, T, hs) each
        y, attention = fused_attention_forward(q, k, v, recompute=self.recompute)  # (B, nh, T, hs)
        out, merge = ops.merge_heads_forward(y)  # (B, T, E)
        self.cache = AttentionCache(split, attention, merge)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        split, attention, merge = self.cache
        # In the forward pass this was: out = merge_heads(y)
        dy = ops.merge_heads_backward(dout, merge).contiguous()  # (B, nh, T, hs), once: two products read it
        # In the forward pass this was: y = softmax(masked(q @ k^T / sqrt(hs))) @ v
        dq, dk, dv = fused_attention_backward(dy, attention)  # (B, nh, T, hs) each
        # In the forward pass this was: q, k, v = split_heads(qkv)
        return fused_split_heads_backward(dq, dk, dv, split)  # (B, T, 3E)

    def attention_weights(self) -> Tensor:
        """att (B, nh, T, T) of the last forward pass (rebuilt from q, k when it was not kept)."""
        _, attention, _ = self.cache
        return attention.att if attention.att is not None else fused_attention_weights(attention.q, attention.k)

    def __repr__(self) -> str:
        return f"CausalSelfAttention(n_head={self.n_head}{', recompute' if self.recompute else ''})"


class Dropout(Layer):
    """Inverted dropout: in training each entry is zeroed with probability p and the others scaled
    by 1/(1 - p), so that eval mode, the identity, sees the same expected activation. (..., H) -> (..., H).

    The masks come from a generator of the layer's own, not the batches' one: forward call number c
    is seeded from (seed, c), and both numbers are the buffer `<name>.rng`, (2,) int64, which a
    checkpoint saves, so a resumed run draws the masks an uninterrupted one would have drawn.
    With `replay` set, a forward pass reuses the last masks instead of drawing (and counting) new
    ones: the reference passes of `check --model` and --verify-every differentiate the very
    function the hand-written backward did (models.transformer.TransformerModel.replaying).
    """

    def __init__(self, p: float, seed: int, name: str = "dropout") -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.name = p, name
        self.buffers = {f"{name}.rng": torch.tensor([seed, 0], dtype=torch.int64)}  # (2,) seed, calls so far
        self.mask: Tensor | None = None
        self.replay = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            self.mask = None
            return x
        if self.replay:
            if self.mask is None or self.mask.shape != x.shape:
                raise RuntimeError(f"{self.name}: no mask of shape {tuple(x.shape)} to replay")
            return x * self.mask.to(x.dtype)  # (..., H)
        rng = self.buffers[f"{self.name}.rng"]  # (2,)
        seed, calls = rng.tolist()
        g = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + calls)
        rng[1] += 1
        keep = torch.rand(x.shape, generator=g, device=x.device) >= self.p  # (..., H) bool
        self.mask = keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))  # (..., H) 0 or 1/(1-p)
        return x * self.mask  # (..., H)

    def backward(self, dout: Tensor) -> Tensor:
        # In the forward pass this was: out = x * mask (x itself in eval mode)
        return dout if self.mask is None else dout * self.mask.to(dout.dtype)  # (..., H)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class Branch(Sequential):
    """A Sequential that keeps, from its last passes, each layer's output (`outs`) and the gradient
    of each layer's output (`douts`), in forward order: the rows `check --model` prints."""

    def forward(self, x: Tensor, outs: list[Tensor] | None = None) -> Tensor:
        self.outs: list[Tensor] = []
        x = super().forward(x, outs=self.outs)  # (B, T, E)
        if outs is not None:
            outs.extend(self.outs)
        return x

    def backward(self, dout: Tensor, douts: list[Tensor] | None = None) -> Tensor | None:
        self.douts: list[Tensor] = []
        dx = super().backward(dout, douts=self.douts)  # (B, T, E)
        if douts is not None:
            douts[:] = self.douts
        return dx


class Block(Branch):
    """makemore's Block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). (B, T, E) -> (B, T, E).

    `keys` name the sub-layers' outputs of the attention branch and of the MLP branch, and `residual`
    the first residual's output (x + attn): the inner rows of `check --model`. The block's own
    output, the second residual's, is the table's row for the block.
    """

    def __init__(self, attention: Branch, mlp: Branch, attention_keys: list[str], mlp_keys: list[str],
                 residual_key: str = "res") -> None:
        if len(attention_keys) != len(attention.layers) or len(mlp_keys) != len(mlp.layers):
            raise ValueError("one key per sub-layer of each branch")
        super().__init__([Residual(attention), Residual(mlp)])
        self.attention, self.mlp = attention, mlp
        self.keys = (attention_keys, residual_key, mlp_keys)

    def forward(self, x: Tensor, outs: list[Tensor] | None = None) -> Tensor:
        out = super().forward(x, outs)  # (B, T, E)
        if not self.training:
            # eval mode (evaluation, sampling) has no backward to come: drop what this block's
            # layers kept, so that one block's activations are alive at a time, not every block's
            # (a split of 4096 words: ~0.3 GB a block)
            for layer in self.leaves():
                layer.cache = None
            self.outs, self.attention.outs, self.mlp.outs = [], [], []
        return out

    def _named(self, attention: list[Tensor], residual: Tensor, mlp: list[Tensor]) -> dict[str, Tensor]:
        """Backward order: the MLP branch last layer first, the residual, the attention branch."""
        attention_keys, residual_key, mlp_keys = self.keys
        named = dict(reversed(list(zip(mlp_keys, mlp))))
        named[residual_key] = residual
        named |= dict(reversed(list(zip(attention_keys, attention))))
        return named

    def inner_outputs(self) -> dict[str, Tensor]:
        """Every intermediate of the last forward pass, in backward order."""
        return self._named(self.attention.outs, self.outs[0], self.mlp.outs)

    def inner_grads(self) -> dict[str, Tensor]:
        """d loss / d (each intermediate) of the last backward pass, keyed as inner_outputs."""
        return self._named(self.attention.douts, self.douts[0], self.mlp.douts)

    def inner_params(self) -> dict[str, list[str]]:
        """Each intermediate's key -> the names of the parameters of the layer that made it."""
        attention_keys, _, mlp_keys = self.keys
        pairs = [*zip(attention_keys, self.attention.layers), *zip(mlp_keys, self.mlp.layers)]
        return {key: list(layer.params) for key, layer in pairs if layer.params}

    def attention_layers(self) -> list[CausalSelfAttention]:
        return [layer for layer in self.attention.layers if isinstance(layer, CausalSelfAttention)]

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in [*self.attention.layers, *self.mlp.layers])
        return f"Block({inner})"
