"""Layers of the transformer (makemore's GPT): each over (B, T, E) activations, with the ops' backwards.

    LayerNorm            each position's E features normalised on their own (ops.layernorm)
    GELU                 the tanh approximation (ops.gelu)
    CausalSelfAttention  the fused qkv (B, T, 3E) -> heads -> causal attention -> merged heads (B, T, E)
    Dropout              inverted dropout, counter-based masks from a seed of its own; the identity in eval mode
    Branch               a Sequential that keeps its layers' outputs and their gradients (for check rows)
    Block                the pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))

The qkv and output projections are plain `Linear`s around CausalSelfAttention, as makemore's c_attn
and c_proj, so a block is

    Block(Residual(Branch([LayerNorm, Linear(E, 3E), CausalSelfAttention, Linear(E, E)])),
          Residual(Branch([LayerNorm, Linear(E, 4E), GELU, Linear(4E, E)])))

and every intermediate has a name: after a backward pass Block.inner_grads() holds d loss / d (each
sub-layer's output), keyed as Block.inner_outputs(), so `check --model transformer` prints a row per
intermediate of every block ("L2 Block ln_1", "L2 Block att", ...) and a bug shows where it enters.

Speed. LayerNorm, GELU and the attention's heads run the ops' maths through ops/native_transformer.py:
in C (ops/transformer_kernels.c), one pass per forward or backward, where the tensors are contiguous
float32 on the CPU; otherwise (float64, CUDA, autograd's reference passes, no compiler) the fused
torch forms of ops/fused_transformer.py. Each is the readable op of `ops` term for term, tested
against it and against autograd. In eval mode (no backward to come) they keep no cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backprop_ninja.ops import native_transformer
from backprop_ninja.ops.dropout import DropoutCache, dropout_backward, dropout_key
from backprop_ninja.nn.containers import Residual, Sequential
from backprop_ninja.nn.layers import Layer
from backprop_ninja.nn.sequence_layers import LiveRows


class LayerNorm(Layer):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim: (..., E) -> (..., E)."""

    def __init__(self, weight: Tensor, bias: Tensor, names: tuple[str, str] = ("weight", "bias")) -> None:
        super().__init__()
        self.w_name, self.b_name = names
        self.params = {self.w_name: weight, self.b_name: bias}

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = native_transformer.layernorm_forward(
            x, self.params[self.w_name], self.params[self.b_name], keep=self.training)  # (..., E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        dx, dweight, dbias = native_transformer.layernorm_backward(dout, self.cache)  # (..., E), (E,), (E,)
        self.grads = {self.w_name: dweight, self.b_name: dbias}
        return dx


class GELU(Layer):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3))): (..., H) -> (..., H)."""

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = native_transformer.gelu_forward(x, keep=self.training)  # (..., H)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return native_transformer.gelu_backward(dout, self.cache)  # (..., H)

    def __repr__(self) -> str:
        return "GELU()"


class CausalSelfAttention(Layer):
    """The heads of makemore's CausalSelfAttention between its two Linears: qkv (B, T, 3E) -> y (B, T, E).

    recompute=True keeps the heads' input but not the (B, nh, T, T) attention weights: the backward
    rebuilds them by the forward's code, bit for bit the same gradients for less memory.
    In a packed pass (`live`, nn.sequence_layers.LiveRows) it reads and writes the live rows (R, ...),
    each sequence's where they are (native_transformer.heads_forward): the one layer of the block
    where positions meet.
    """

    def __init__(self, n_head: int, recompute: bool = False, live: LiveRows | None = None) -> None:
        super().__init__()
        self.n_head, self.recompute = n_head, recompute
        self.live = live or LiveRows()

    def forward(self, qkv: Tensor) -> Tensor:
        # q, k, v = split_heads(qkv); y = softmax(masked(q @ k^T / sqrt(hs))) @ v; out = merge_heads(y)
        # (in a packed pass qkv and out are the live rows, (R, 3E) and (R, E))
        out, self.cache = native_transformer.heads_forward(qkv, self.n_head, self.recompute, keep=self.training,
                                                           packing=self.live.packing)  # (B, T, E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        # In the forward pass this was: out = merge_heads(att @ v), att = softmax(masked(q @ k^T / sqrt(hs)))
        return native_transformer.heads_backward(dout, self.cache)  # (B, T, 3E)

    def attention_weights(self) -> Tensor:
        """att (B, nh, T, T) of the last training-mode forward pass (rebuilt from q, k when it was not kept)."""
        return native_transformer.heads_weights(self.cache)

    def __repr__(self) -> str:
        return f"CausalSelfAttention(n_head={self.n_head}{', recompute' if self.recompute else ''})"


class Dropout(Layer):
    """Inverted dropout: in training each entry is zeroed with probability p and the others scaled
    by 1/(1 - p), so that eval mode, the identity, sees the same expected activation. (..., H) -> (..., H).

    The masks are the layer's own draws, not the batches' generator's: forward call number c draws
    from the key of (seed, c) (ops.dropout: counter-based, the same masks in C and in torch, on any
    device), and both numbers are the buffer `<name>.rng`, (2,) int64, which a checkpoint saves, so a
    resumed run draws the masks an uninterrupted one would have drawn.
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
        rng[1] += 1
        out, cache = native_transformer.dropout_forward(x, dropout_key(seed, calls), self.p)  # (..., H)
        self.mask = cache.mask  # (..., H) 0 or 1/(1-p)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        # In the forward pass this was: out = x * mask (x itself in eval mode)
        return dout if self.mask is None else dropout_backward(dout, DropoutCache(self.mask))  # (..., H)

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
