"""makemore's sequence models: --model bigram, rnn, gru and bow, each over whole words.

All read X (B, T) ids ([start] + a word, padded) and give (B, T, V) logits, one prediction per
position; makemore's architectures and defaults (n_embd 64, n_embd2 64 = our n_hidden).
Initialisation as PyTorch's, which makemore uses: embeddings N(0, 1), a Linear's weight and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); makemore's zeros for the bigram table and the start state.
Every value is drawn from the generator given, in the order the layers are listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backprop_ninja.models.base import ModelConfig, SequenceConfig, SequenceModel
from backprop_ninja.nn import GRU, RNN, CausalBoW, Embedding, Linear, PositionEmbedding, Residual, Sequential, Tanh


@dataclass(frozen=True)
class BigramConfig(ModelConfig):
    """The bigram's shape is its vocabulary's; block_size only bounds the samples' length."""

    model: str = "bigram"
    vocab_size: int = 27
    block_size: int = 16

    @property
    def hidden_width(self) -> int:
        return self.vocab_size


def torch_linear_init(fan_in: int, fan_out: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """nn.Linear's default initial values, (fan_in, fan_out) weight and (fan_out,) bias, from g."""
    bound = fan_in**-0.5
    w = (torch.rand((fan_in, fan_out), generator=g) * 2 - 1) * bound  # (F, H)
    b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound  # (H,)
    return w, b


def build_bigram(config: ModelConfig, g: torch.Generator) -> SequenceModel:
    """A (V, V) table of logits: row x holds the logits of the character after x. 729 parameters."""
    V = config.vocab_size
    table = torch.zeros((V, V))  # (V, V) makemore's start: every next character equally likely
    return SequenceModel(config, Sequential([Embedding(table, name="logits")]))  # (B, T, V)


def build_rnn(config: SequenceConfig, g: torch.Generator) -> SequenceModel:
    """Embedding, then h_t = tanh([x_t, h_{t-1}] @ W + b) from a learned start state, then a linear
    head on every h_t. Names: C, start, W, b, W_out, b_out."""
    V, E, H = config.vocab_size, config.n_embd, config.n_hidden
    C = torch.randn((V, E), generator=g)  # (V, E)
    W, b = torch_linear_init(E + H, H, g)  # (E+H, H), (H,)
    W_out, b_out = torch_linear_init(H, V, g)  # (H, V), (V,)
    return SequenceModel(config, Sequential([
        Embedding(C, name="C"),  # (B, T, E)
        RNN(torch.zeros((1, H)), {"W": W, "b": b}),  # (B, T, H)
        Linear(W_out, b_out, names=("W_out", "b_out")),  # (B, T, V)
    ]))


def build_gru(config: SequenceConfig, g: torch.Generator) -> SequenceModel:
    """Embedding, makemore's GRU cell from a learned start state, a linear head on every h_t.
    Names: C, start, W_r, b_r, W_hbar, b_hbar, W_z, b_z, W_out, b_out."""
    V, E, H = config.vocab_size, config.n_embd, config.n_hidden
    C = torch.randn((V, E), generator=g)  # (V, E)
    W_z, b_z = torch_linear_init(E + H, H, g)  # makemore's order of the cell's Linears: z, r, hbar
    W_r, b_r = torch_linear_init(E + H, H, g)
    W_hbar, b_hbar = torch_linear_init(E + H, H, g)
    W_out, b_out = torch_linear_init(H, V, g)  # (H, V), (V,)
    cell = {"W_r": W_r, "b_r": b_r, "W_hbar": W_hbar, "b_hbar": b_hbar, "W_z": W_z, "b_z": b_z}  # the op's order
    return SequenceModel(config, Sequential([
        Embedding(C, name="C"),  # (B, T, E)
        GRU(torch.zeros((1, H)), cell),  # (B, T, H)
        Linear(W_out, b_out, names=("W_out", "b_out")),  # (B, T, V)
    ]))


def build_bow(config: SequenceConfig, g: torch.Generator) -> SequenceModel:
    """Token + position embeddings, x + CausalBoW(x), x + MLP(x) with a tanh, a linear head.
    Names: C, P, W_fc, b_fc, W_proj, b_proj, W_out, b_out."""
    V, T, E, H = config.vocab_size, config.block_size, config.n_embd, config.n_hidden
    C = torch.randn((V, E), generator=g)  # (V, E)
    P = torch.randn((T, E), generator=g)  # (T, E)
    W_fc, b_fc = torch_linear_init(E, H, g)  # (E, H), (H,)
    W_proj, b_proj = torch_linear_init(H, E, g)  # (H, E), (E,)
    W_out, b_out = torch_linear_init(E, V, g)  # (E, V), (V,)
    mlp = Sequential([Linear(W_fc, b_fc, names=("W_fc", "b_fc")), Tanh(),
                      Linear(W_proj, b_proj, names=("W_proj", "b_proj"))])  # (B, T, E)
    return SequenceModel(config, Sequential([
        Embedding(C, name="C"),  # (B, T, E)
        PositionEmbedding(P, name="P"),  # (B, T, E)
        Residual(CausalBoW()),  # (B, T, E) x + the mean of x over the past
        Residual(mlp),  # (B, T, E)
        Linear(W_out, b_out, names=("W_out", "b_out")),  # (B, T, V)
    ]))
