"""The models: stacks of hand-differentiated layers ending in a cross-entropy loss.

Every model is a `Model`: a Sequential of layers from `layers`, its config, and three entry points
that the train/eval/sample/checkpoint machinery uses without knowing which model it has:

    loss, grads = model.loss_and_grads(Xb, Yb)   # training-mode forward + hand-written backward
    logits = model.logits(X)                    # eval mode (BatchNorm uses its buffers)
    model.calibrate(Xtr)                        # BatchNorm buffers := statistics of the training set

Builders draw every initial value from the seeded torch.Generator they are given, in a fixed
order, so a seed fixes the model. The registry MODELS maps `--model NAME` to a builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

import torch.nn.functional as F

from backprop_ninja import ops
from backprop_ninja.errors import UserError
from backprop_ninja.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh

LECTURE_SEED = 2147483647  # torch.Generator().manual_seed(2147483647), as in every makemore lecture


@dataclass(frozen=True)
class ModelConfig:
    model: str = "mlp"
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


class Model:
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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def loss_and_grads(self, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One training-mode forward pass and the hand-written backward pass: (loss, {name: grad})."""
        self.net.train(True)
        logits = self.net.forward(X)  # (B, V)
        loss, ce_cache = ops.cross_entropy_forward(logits, Y)  # ()
        self.net.backward(ops.cross_entropy_backward(ce_cache))
        return loss, self.net.grads

    def autograd_loss_and_grads(self, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The reference: the same forward pass, differentiated by torch autograd.

        Runs on detached copies of the parameters, so the model (parameters and BatchNorm
        buffers) is left exactly as it was.
        """
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in self.params.items()}
        with torch.enable_grad(), self.net.substituted(leaves):
            self.net.train(True)
            loss = F.cross_entropy(self.net.forward(X), Y)  # ()
            loss.backward()
        return loss.detach(), {k: leaf.grad for k, leaf in leaves.items()}

    @torch.no_grad()
    def logits(self, X: Tensor) -> Tensor:
        """Eval-mode forward pass: (N, block_size) contexts -> (N, V) logits."""
        self.net.train(False)
        return self.net.forward(X)

    @torch.no_grad()
    def calibrate(self, X: Tensor) -> None:
        """Set every BatchNorm's statistics to those of X, as the lecture does after training."""
        self.net.calibrate(X)

    def __repr__(self) -> str:
        return f"Model({self.config.model}, {self.num_params()} parameters)\n{self.net!r}"


# ---------------------------------------------------------------------------------------------
# --model mlp: the network of makemore part 4


def build_mlp(config: ModelConfig, g: torch.Generator) -> Model:
    """The lecture's MLP: embedding -> Linear -> BatchNorm -> tanh -> Linear, lecture names.

    Initial values as in the lecture, drawn in its order (C, W1, b1, W2, b2, bngain, bnbias) from one
    generator. The lecture draws bngain/bnbias from the global RNG; here they come from the same
    seeded generator, so a seed fixes everything. Several are deliberately non-zero so that a
    wrong backward pass cannot hide behind zeros.
    """
    V, T, E, H = config.vocab_size, config.block_size, config.n_embd, config.n_hidden
    C = torch.randn((V, E), generator=g)  # (V, E)
    W1 = torch.randn((E * T, H), generator=g) * (5 / 3) / ((E * T) ** 0.5)  # (T*E, H) tanh gain
    b1 = torch.randn(H, generator=g) * 0.1  # (H,) useless before BatchNorm, kept to check its grad
    W2 = torch.randn((H, V), generator=g) * 0.1  # (H, V)
    b2 = torch.randn(V, generator=g) * 0.1  # (V,)
    bngain = torch.randn((1, H), generator=g) * 0.1 + 1.0  # (1, H)
    bnbias = torch.randn((1, H), generator=g) * 0.1  # (1, H)
    net = Sequential(
        [
            Embedding(C, name="C"),
            FlattenConsecutive(T),  # emb.view(B, -1)
            Linear(W1, b1, names=("W1", "b1")),
            BatchNorm1d(bngain, bnbias, names=("bngain", "bnbias"), buffer_names=("bnmean", "bnvar"),
                        momentum=0.001),
            Tanh(),
            Linear(W2, b2, names=("W2", "b2")),
        ]
    )
    # keep the lecture's parameter order (C, W1, b1, W2, b2, bngain, bnbias) for tables and files
    order = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
    net.params = {name: net.params[name] for name in order}
    return Model(config, net)


@dataclass(frozen=True)
class ModelSpec:
    """A model of the registry: how to build it, its default shape and its training recipe."""

    build: Callable[[ModelConfig, torch.Generator], Model]
    block_size: int
    n_embd: int
    n_hidden: int
    steps: int  # default number of training steps
    decay_at: float  # fraction of the steps after which lr drops to lr/10
    summary: str


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(build_mlp, block_size=3, n_embd=10, n_hidden=200, steps=200_000, decay_at=0.5,
                     summary="makemore part 4: embedding, Linear, BatchNorm, tanh, Linear"),
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
