"""makemore's Transformer (a small GPT): --model transformer, every backward by hand.

    tok_emb = wte(idx); x = tok_emb + wpe(pos)            Embedding, PositionEmbedding
    for block in h: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))   n_layer x Block
    logits = lm_head(ln_f(x))                               LayerNorm, Linear without bias

makemore's defaults: 4 layers, 4 heads, n_embd 64 (so ~0.2M parameters), block size the data's
longest word + 1 (16 on names.txt). The attention is one fused qkv Linear (with bias), the heads
(nn.CausalSelfAttention), and an output projection; the MLP is E -> 4E -> GELU (tanh) -> E.

Initialisation as PyTorch's, which makemore uses: nn.Embedding N(0, 1); a Linear's weight and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (models.sequence.torch_linear_init; the head has no bias); a
LayerNorm's weight 1 and bias 0. Every value is drawn from the generator given, in layer order.

Parameter names are makemore's own without its `transformer.` prefix (wte, wpe, h.0.ln_1.weight,
h.0.attn.c_attn.weight, ..., ln_f.weight, lm_head.weight), so the autograd twin
(benchmarks/twin_transformer.py) pairs them by name; our Linear weights are (fan_in, fan_out), the
transpose of torch's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from backprop_ninja.errors import UserError
from backprop_ninja.models.base import ModelConfig, SequenceModel
from backprop_ninja.models.sequence import torch_linear_init
from backprop_ninja.nn import (
    GELU, Block, Branch, CausalSelfAttention, Dropout, Embedding, LayerNorm, Linear, LiveRows, PackRows,
    PositionEmbedding, Sequential, UnpackRows,
)
from backprop_ninja.ops import native_transformer
from backprop_ninja.ops.packing import live_packing
from backprop_ninja.threads import C_PRODUCTS_SINGLE_THREAD_BELOW, SINGLE_THREAD_BELOW

# the keys of a block's intermediates, in forward order: the rows `check --model` prints
ATTENTION_KEYS = ["ln_1", "qkv", "att", "att_proj"]  # ln_1(x), c_attn(.), the heads, c_proj(.)
RESIDUAL_KEY = "x+att"  # x + attn(ln_1(x))
MLP_KEYS = ["ln_2", "fc", "gelu", "mlp_proj"]  # ln_2(x), c_fc(.), gelu(.), c_proj(.)


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """makemore's ModelConfig for the transformer; block_size is the data's longest word + 1."""

    model: str = "transformer"
    vocab_size: int = 27
    block_size: int = 16
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0  # makemore has none; the share of activations zeroed after the embeddings and each branch

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_head, self.n_embd) < 1 or self.n_embd % self.n_head:
            raise UserError(f"{self.model}: n_embd {self.n_embd} must be a positive multiple of n_head "
                            f"{self.n_head} (each head reads n_embd / n_head features), with n_layer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{self.model}: dropout {self.dropout} must be in [0, 1)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_width(self) -> int:
        return 4 * self.n_embd  # the MLP's, the widest activations per position


def layer_norm(E: int, prefix: str) -> LayerNorm:
    return LayerNorm(torch.ones(E), torch.zeros(E), names=(f"{prefix}.weight", f"{prefix}.bias"))  # (E,), (E,)


def linear(fan_in: int, fan_out: int, prefix: str, g: torch.Generator, bias: bool = True) -> Linear:
    w, b = torch_linear_init(fan_in, fan_out, g) if bias else (torch_linear_init(fan_in, fan_out, g)[0], None)
    return Linear(w, b, names=(f"{prefix}.weight", f"{prefix}.bias"), kernels=native_transformer)  # (F, H), (H,)


def block(E: int, n_head: int, prefix: str, g: torch.Generator, recompute: bool = False,
          dropouts: tuple[Dropout, Dropout] | None = None, live: LiveRows | None = None) -> Block:
    """makemore's Block, its Linears drawn in its order: c_attn, attn.c_proj, c_fc, mlp.c_proj; with
    `dropouts`, one at the end of each branch (GPT-2's resid_dropout); `live`: the model's packing.
    Shapes (B, T, ...) as written, (R, ...) in a packed pass."""
    attention = Branch([
        layer_norm(E, f"{prefix}.ln_1"),  # (B, T, E)
        linear(E, 3 * E, f"{prefix}.attn.c_attn", g),  # (B, T, 3E)
        CausalSelfAttention(n_head, recompute, live),  # (B, T, E)
        linear(E, E, f"{prefix}.attn.c_proj", g),  # (B, T, E)
        *(dropouts or ())[:1],  # (B, T, E)
    ])
    mlp = Branch([
        layer_norm(E, f"{prefix}.ln_2"),  # (B, T, E)
        linear(E, 4 * E, f"{prefix}.mlp.c_fc", g),  # (B, T, 4E)
        GELU(),  # (B, T, 4E)
        linear(4 * E, E, f"{prefix}.mlp.c_proj", g),  # (B, T, E)
        *(dropouts or ())[1:],  # (B, T, E)
    ])
    extra = (["att_drop"], ["mlp_drop"]) if dropouts else ([], [])
    return Block(attention, mlp, ATTENTION_KEYS + extra[0], MLP_KEYS + extra[1], RESIDUAL_KEY)


class TransformerModel(SequenceModel):
    """A SequenceModel whose passes with targets (training, evaluation) run on the batch's live
    positions only (ops.packing), and whose reference passes (autograd, finite differences) can
    replay the dropout masks of its last training-mode forward pass: the function they
    differentiate is then the one the hand-written backward differentiated."""

    def __init__(self, config: TransformerConfig, net: Sequential, live: LiveRows) -> None:
        super().__init__(config, net)
        self.live = live  # read by the net's PackRows, UnpackRows and attention layers

    @contextmanager
    def live_batch(self, X: Tensor, Y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch cut to its longest live prefix T' (B, T'), the layers set to pack its live
        positions: a position past a sequence's last prediction reaches no term of the loss (the
        attention is causal), so the loss and every gradient are those of the whole batch, and a
        batch of short words costs the rows it predicts. A batch that predicts nothing runs as it
        is, for the loss to refuse."""
        packing = live_packing(Y)
        if packing.positions == 0:
            yield X, Y
            return
        with self.live.packed(packing):
            yield X[:, :packing.positions], Y[:, :packing.positions]  # (B, T'), (B, T')

    @property
    def single_thread_below(self) -> int:
        """Its Linears' products run in C on one thread (native_transformer): one thread up to a
        larger step than torch-only steps (threads.C_PRODUCTS_SINGLE_THREAD_BELOW)."""
        return C_PRODUCTS_SINGLE_THREAD_BELOW if native_transformer.native_available() else SINGLE_THREAD_BELOW

    @staticmethod
    def loss_forward(logits: Tensor, Y: Tensor) -> tuple[Tensor, tuple]:
        return native_transformer.sequence_cross_entropy_forward(logits, Y)  # (), cache: in C where it can

    @staticmethod
    def loss_backward(cache: tuple) -> Tensor:
        return native_transformer.sequence_cross_entropy_backward(cache)  # dlogits (B, T, V)

    def dropouts(self) -> list[Dropout]:
        return [layer for layer in self.net.leaves() if isinstance(layer, Dropout)]

    @contextmanager
    def replaying(self) -> Iterator["TransformerModel"]:
        """Forward passes inside reuse the last masks (and draw none)."""
        layers = self.dropouts()
        for layer in layers:
            layer.replay = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.replay = False

    def autograd_loss_and_grads(self, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """As Model's, on the masks of the last training step (--verify-every checks that step)."""
        if not any(layer.mask is not None for layer in self.dropouts()):
            return super().autograd_loss_and_grads(X, Y)
        with self.replaying():
            return super().autograd_loss_and_grads(X, Y)


def build_transformer(config: TransformerConfig, g: torch.Generator, recompute: bool = False) -> TransformerModel:
    """Token and position embeddings, n_layer pre-LayerNorm blocks, a final LayerNorm and a linear head
    without bias. recompute=True rebuilds the attention weights in the backward (less memory).

    With config.dropout > 0: Dropout after the embeddings and at the end of each branch (GPT-2's
    drop and resid_dropout), each seeded by a number drawn from g after every weight, so that the
    weights are those of the model without dropout."""
    V, T, E, p = config.vocab_size, config.block_size, config.n_embd, config.dropout
    wte = torch.randn((V, E), generator=g)  # (V, E)
    wpe = torch.randn((T, E), generator=g)  # (T, E)
    drop = [Dropout(p, 0, "drop")] if p > 0 else []  # (B, T, E) the seeds are drawn below

    def branch_dropouts(i: int) -> tuple[Dropout, Dropout] | None:
        return (Dropout(p, 0, f"h.{i}.attn.drop"), Dropout(p, 0, f"h.{i}.mlp.drop")) if p > 0 else None

    live = LiveRows()  # the packing of a pass with targets (TransformerModel.live_batch)
    blocks = [block(E, config.n_head, f"h.{i}", g, recompute, branch_dropouts(i), live)
              for i in range(config.n_layer)]
    head = [layer_norm(E, "ln_f"), linear(E, V, "lm_head", g, bias=False)]  # (R, E), (R, V)
    model = TransformerModel(config, Sequential([
        Embedding(wte, name="wte"),  # (B, T, E)
        PositionEmbedding(wpe, name="wpe"),  # (B, T, E)
        PackRows(live),  # (R, E) the live positions (the identity in a pass without targets)
        *drop,  # (R, E)
        *blocks,  # (R, E) each
        *head,
        UnpackRows(live),  # (B, T, V) zeros at the dead positions, which predict nothing
    ]), live)
    for layer in model.dropouts():  # in layer order, after every weight
        layer.buffers[f"{layer.name}.rng"][0] = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return model
