"""The model registry: `--model NAME` -> how to build it, its default shape and its training recipe.

    base.py       ModelConfig and Model, what every model is
    mlp.py        makemore part 4's MLP (the lecture network), and the test of its layer pattern
    deep_mlp.py   makemore part 3's deep MLP
    wavenet.py    makemore part 5's hierarchical network
    sequence.py   makemore's bigram, rnn, gru and bow, over whole words
    transformer.py  makemore's transformer (a small GPT), over whole words

Builders draw every initial value from the seeded torch.Generator they are given, in a fixed
order, so a seed fixes the model. A new model family: a module here with its config dataclass and
builder, and one entry in MODELS (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backprop_ninja.errors import UserError
from backprop_ninja.models.base import Model, ModelConfig, SequenceConfig, SequenceModel
from backprop_ninja.models.deep_mlp import build_deep_mlp
from backprop_ninja.models.mlp import MLPConfig, build_mlp, is_lecture_mlp
from backprop_ninja.models.sequence import BigramConfig, build_bigram, build_bow, build_gru, build_rnn
from backprop_ninja.models.transformer import TransformerConfig, build_transformer
from backprop_ninja.models.wavenet import build_wavenet


@dataclass(frozen=True)
class ModelSpec:
    """A model of the registry: how to build it, its default shape and its training recipe."""

    build: Callable[[ModelConfig, torch.Generator], Model]
    defaults: ModelConfig  # the default shape; vocab_size is the data's
    steps: int  # default number of training steps
    decay_at: float  # fraction of the steps after which lr drops to lr/10
    summary: str
    # Report the weights averaged over the steps after this fraction of the run (stochastic weight
    # averaging, training.averaging.WeightAverage), or None: the last weights, as the lectures do.
    average_from: float | None = None
    view: str = "windows"  # the data it reads: context windows, or whole words ("sequences")
    optimizer: str = "sgd"  # the default update (train --optimizer)
    # the recipe's learning rate and weight decay with that update; None: the update's own defaults
    lr: float | None = None
    weight_decay: float | None = None

    @property
    def block_size(self) -> int | None:
        """The default context length; None for a model of whole words, whose block is the data's
        longest word + 1."""
        return self.defaults.block_size if self.view == "windows" else None

    def config(self, vocab_size: int, **overrides) -> ModelConfig:
        """The default shape with the data's vocabulary and the options given (None: not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        fields = {f.name for f in dataclasses.fields(self.defaults)}
        for name in given.keys() - fields:
            raise UserError(f"{self.defaults.model} has no {name} (its shape: {', '.join(sorted(fields))})")
        return dataclasses.replace(self.defaults, vocab_size=vocab_size, **given)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(build_mlp, MLPConfig("mlp", block_size=3, n_embd=10, n_hidden=200), steps=200_000,
                     decay_at=0.5, summary="makemore part 4: embedding, Linear, BatchNorm, tanh, Linear"),
    "deep-mlp": ModelSpec(
        build_deep_mlp, MLPConfig("deep-mlp", block_size=3, n_embd=10, n_hidden=100), steps=200_000, decay_at=0.75,
        summary="makemore part 3: embedding, 5 x (Linear, BatchNorm, tanh), Linear, BatchNorm",
    ),
    "wavenet": ModelSpec(
        build_wavenet, MLPConfig("wavenet", block_size=8, n_embd=24, n_hidden=128), steps=200_000, decay_at=0.75,
        summary="makemore part 5: embedding, 3 x (flatten pairs, Linear, BatchNorm, tanh), Linear",
        average_from=0.75,  # the lr = 0.01 phase (docs/models.md)
    ),
    "bigram": ModelSpec(
        build_bigram, BigramConfig(), steps=30_000, decay_at=0.75,
        summary="makemore's bigram: a (V, V) table of next-character logits", view="sequences", optimizer="adamw",
    ),
    "rnn": ModelSpec(
        build_rnn, SequenceConfig("rnn"), steps=30_000, decay_at=0.75,
        summary="makemore's rnn: embedding, h_t = tanh(Linear([x_t, h_{t-1}])), a linear head on every h_t",
        view="sequences", optimizer="adamw",
    ),
    "gru": ModelSpec(
        build_gru, SequenceConfig("gru"), steps=30_000, decay_at=0.75,
        summary="makemore's gru: embedding, the GRU cell (reset and update gates), a linear head on every h_t",
        view="sequences", optimizer="adamw",
    ),
    "bow": ModelSpec(
        build_bow, SequenceConfig("bow"), steps=30_000, decay_at=0.75,
        summary="makemore's bow: token + position embeddings, x + causal mean, x + MLP, a linear head",
        view="sequences", optimizer="adamw",
    ),
    "transformer": ModelSpec(
        build_transformer, TransformerConfig(dropout=0.1), steps=28_000, decay_at=0.7,
        summary="makemore's transformer: token + position embeddings, 4 pre-LayerNorm blocks (causal self-attention, "
                "MLP with GELU), LayerNorm, a linear head; dropout 0.1",
        view="sequences", optimizer="adamw", lr=2e-3, weight_decay=0.05,  # docs/models.md: the runs behind them
        average_from=0.7,  # the lr / 10 phase
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UserError(f"unknown model {name!r}; known models: {known}") from None


def build_model(config: ModelConfig, g: torch.Generator) -> Model:
    """Build `config.model`, drawing its initial values from g (which the caller may go on using,
    as the lecture does, to draw the batches)."""
    return get_spec(config.model).build(config, g)


__all__ = ["MODELS", "MLPConfig", "Model", "ModelConfig", "ModelSpec", "SequenceConfig", "SequenceModel", "build_model",
           "get_spec", "is_lecture_mlp"]
