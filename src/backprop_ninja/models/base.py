"""What every model is: a config, a stack of hand-differentiated layers, and a cross-entropy loss.

Every model is a `Model`: a container of layers from `nn`, its config, and the entry points that
the train/eval/sample/checkpoint machinery uses without knowing which model it has:

    loss, grads = model.loss_and_grads(Xb, Yb)   # training-mode forward + hand-written backward
    logits = model.logits(X)                    # eval mode (BatchNorm uses its buffers)
    model.calibrate(Xtr)                        # BatchNorm buffers := statistics of the training set

A `Model` reads context windows (data.windows: X (B, T), Y (B,)) and predicts one character per
row; a `SequenceModel` reads whole words (data.sequences: X (B, T), Y (B, T) padded with -1) and
predicts every position. `model.view` says which; the loss is each one's own (loss_forward,
loss_backward, and reference_loss for autograd).

Each model family has its own config dataclass, a subclass of ModelConfig; run.json stores it and
checkpoint loading checks every field against its declared type.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.conventions import IGNORE_INDEX
from backprop_ninja.data import distinct_contexts
from backprop_ninja.nn import Sequential
from backprop_ninja.threads import SINGLE_THREAD_BELOW


@dataclass(frozen=True)
class ModelConfig:
    """The fields every model has; a family's config adds its own (MLPConfig: n_embd, n_hidden)."""

    model: str
    vocab_size: int
    block_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Each field's declared type (int, float, str, bool), for checking a stored record."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @property
    def hidden_width(self) -> int:
        """The width of the widest activations per example and position: it sets a step's threads."""
        raise NotImplementedError


class Model:
    view = "windows"  # the data it reads (data.VIEWS)
    single_thread_below = SINGLE_THREAD_BELOW  # its readable step's threads: threads.threads_for

    def __init__(self, config: ModelConfig, net: Sequential) -> None:
        self.config = config
        self.net = net

    @property
    def params(self) -> dict[str, Tensor]:
        """Name -> parameter tensor, in the model's fixed order."""
        return self.net.params

    @property
    def buffers(self) -> dict[str, Tensor]:
        """Name -> BatchNorm statistic (running or calibrated)."""
        return self.net.buffers

    @property
    def device(self) -> torch.device:
        """Where the parameters live (all of them: Model.to moves them together)."""
        return next(iter(self.params.values())).device

    def to(self, device: torch.device | str) -> "Model":
        """Move parameters and buffers in place, so every layer that holds them sees the move."""
        for tensor in [*self.params.values(), *self.buffers.values()]:
            if tensor.device != torch.device(device):
                tensor.data = tensor.data.to(device)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # the loss: the mean cross-entropy of the predicted characters
    @staticmethod
    def loss_forward(logits: Tensor, Y: Tensor) -> tuple[Tensor, tuple]:
        return ops.cross_entropy_forward(logits, Y)  # (), cache

    @staticmethod
    def loss_backward(cache: tuple) -> Tensor:
        return ops.cross_entropy_backward(cache)  # dlogits

    @staticmethod
    def reference_loss(logits: Tensor, Y: Tensor) -> Tensor:
        """The loss as torch computes it, for autograd and finite differences."""
        return F.cross_entropy(logits, Y)  # ()

    @contextmanager
    def live_batch(self, X: Tensor, Y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch a pass that computes its loss runs on (training, the reference passes, the
        evaluation of a split), and whatever the pass needs set up for it: here the batch itself (a
        TransformerModel trims and packs it to its live positions)."""
        yield X, Y

    def loss_and_grads(self, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One training-mode forward pass and the hand-written backward pass: (loss, {name: grad})."""
        self.net.train(True)
        with self.live_batch(X, Y) as (X, Y):
            logits = self.net.forward(X)  # (B, V) or (B, T, V)
            loss, loss_cache = self.loss_forward(logits, Y)  # ()
            self.net.backward(self.loss_backward(loss_cache))
        return loss, self.net.grads

    def autograd_loss_and_grads(self, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The reference: the same forward pass, differentiated by torch autograd.

        Runs on detached copies of the parameters, so the model (parameters and BatchNorm
        buffers) is left exactly as it was.
        """
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in self.params.items()}
        with torch.enable_grad(), self.net.substituted(leaves), self.live_batch(X, Y) as (X, Y):
            self.net.train(True)
            loss = self.reference_loss(self.net.forward(X), Y)  # ()
            loss.backward()
        return loss.detach(), {k: leaf.grad for k, leaf in leaves.items()}

    @torch.no_grad()
    def logits(self, X: Tensor) -> Tensor:
        """Eval-mode forward pass: (N, block_size) contexts -> (N, V) logits."""
        self.net.train(False)
        return self.net.forward(X)

    @torch.no_grad()
    def calibrate(self, X: Tensor) -> None:
        """Set every BatchNorm's statistics to those of X, as the lecture does after training.

        The network runs once per distinct context of X, each weighed by how often it occurs.
        """
        contexts = distinct_contexts(X)
        self.net.calibrate(contexts.rows, contexts.counts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.model}, {self.num_params()} parameters)\n{self.net!r}"


@dataclass(frozen=True)
class SequenceConfig(ModelConfig):
    """The shape of makemore's sequence models; block_size is the data's longest word + 1 (16 on names.txt)."""

    model: str = "rnn"
    vocab_size: int = 27
    block_size: int = 16
    n_embd: int = 64  # token (and position) embedding width
    n_hidden: int = 64  # makemore's n_embd2: the recurrent state, or the bag of words' MLP width

    @property
    def hidden_width(self) -> int:
        return max(self.n_embd, self.n_hidden)


class SequenceModel(Model):
    """A model of whole words: X (B, T) inputs -> (B, T, V) logits, one prediction per position,
    the loss the mean over the predicted ones (targets of -1 are padding)."""

    view = "sequences"

    @staticmethod
    def loss_forward(logits: Tensor, Y: Tensor) -> tuple[Tensor, tuple]:
        return ops.sequence_cross_entropy_forward(logits, Y)  # (), cache

    @staticmethod
    def loss_backward(cache: tuple) -> Tensor:
        return ops.sequence_cross_entropy_backward(cache)  # dlogits (B, T, V)

    @staticmethod
    def reference_loss(logits: Tensor, Y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=IGNORE_INDEX)

    def calibrate(self, X: Tensor) -> None:
        """Nothing to calibrate: no BatchNorm."""
