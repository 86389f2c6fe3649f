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
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.data import distinct_contexts
from backprop_ninja.errors import UserError
from backprop_ninja.layers import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Sequential, Tanh

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

    @property
    def device(self) -> torch.device:
        """Where the parameters live (all of them: checkpoint.move_model moves them together)."""
        return next(iter(self.params.values())).device

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
        """Set every BatchNorm's statistics to those of X, as the lecture does after training.

        The network runs once per distinct context of X, each weighed by how often it occurs.
        """
        contexts = distinct_contexts(X)
        self.net.calibrate(contexts.rows, contexts.counts)

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


# ---------------------------------------------------------------------------------------------
# --model deep-mlp: the deep network of makemore part 3

TANH_GAIN = 5 / 3  # torch.nn.init.calculate_gain("tanh"): keeps activations' std steady through tanh
DEEP_MLP_BLOCKS = 5  # hidden Linear + BatchNorm + tanh blocks
BATCHNORM_MOMENTUM = 0.1  # the BatchNorm1d of makemore parts 3 and 5


def build_deep_mlp(config: ModelConfig, g: torch.Generator) -> Model:
    """makemore part 3: embedding, five Linear -> BatchNorm -> tanh blocks, Linear -> BatchNorm.

    Kaiming initialisation, randn / sqrt(fan_in) times the tanh gain 5/3, with no Linear bias
    (the BatchNorm after each Linear subtracts any bias right away; its own beta is the bias).
    The output layer is the lecture's too: a Linear followed by a BatchNorm whose gain starts at 0.1,
    so the first logits are small and the first loss is close to -log(1/V) rather than huge.
    The lecture's last cell leaves the gain at 1.0 as an experiment ("weight *= 1.0 #5/3"): with a
    BatchNorm after each Linear the forward pass does not depend on the weights' scale, which only
    sets their update:data ratio (`diagnostics`); we keep the 5/3 it teaches.

    Draws C, then W1..W6 in order from g. Names: C, W{i}, bngain{i}, bnbias{i} (buffers bnmean{i},
    bnvar{i}) for i = 1..6, the sixth being the output layer.
    """
    V, T, E, H = config.vocab_size, config.block_size, config.n_embd, config.n_hidden
    C = torch.randn((V, E), generator=g)  # (V, E)
    layers: list[Layer] = [Embedding(C, name="C"), FlattenConsecutive(T)]  # (B, T*E)
    widths = [T * E] + [H] * DEEP_MLP_BLOCKS + [V]  # fan-in and fan-out of the six Linears
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        is_output = i == len(widths) - 1
        gain = 1.0 if is_output else TANH_GAIN  # no tanh after the output layer
        W = torch.randn((fan_in, fan_out), generator=g) * gain / fan_in**0.5  # (F, H)
        bngain = torch.full((fan_out,), 0.1 if is_output else 1.0)  # (H,) output: less confident
        layers += [
            Linear(W, None, names=(f"W{i}", f"b{i}")),
            BatchNorm1d(bngain, torch.zeros(fan_out), names=(f"bngain{i}", f"bnbias{i}"),
                        buffer_names=(f"bnmean{i}", f"bnvar{i}"), momentum=BATCHNORM_MOMENTUM),
        ]
        if not is_output:
            layers.append(Tanh())
    return Model(config, Sequential(layers))


# ---------------------------------------------------------------------------------------------
# --model wavenet: the hierarchical network of makemore part 5


def wavenet_levels(block_size: int) -> int:
    """How many FlattenConsecutive(2) levels fuse `block_size` positions into one: log2(block_size)."""
    if block_size < 2 or block_size & (block_size - 1):
        raise UserError(
            f"wavenet fuses pairs of positions level by level, so --block-size must be a power of two "
            f">= 2 (8 gives the lecture's three levels), got {block_size}"
        )
    return block_size.bit_length() - 1


def build_wavenet(config: ModelConfig, g: torch.Generator) -> Model:
    """makemore part 5: embedding, then per level FlattenConsecutive(2) -> Linear -> BatchNorm -> tanh,
    then Linear to the logits.

    Each level concatenates pairs of neighbouring positions, (B, T, E) -> (B, T/2, 2E), so
    log2(block_size) levels (three at the default 8) fuse the context into one vector. Until the
    last level the tensors are 3-D and BatchNorm takes its statistics over batch and positions.
    Initialisation as in the lecture: randn / sqrt(fan_in) without gain, no bias before a
    BatchNorm, and the last layer's weights scaled by 0.1 so the first predictions are nearly
    uniform. 76,579 parameters at the defaults (vocabulary 27, n_embd 24, n_hidden 128).

    Draws C, then W1, W2, ... in order from g. Names: C, W{i}, bngain{i}, bnbias{i} (buffers
    bnmean{i}, bnvar{i}) per level i, then the output layer's W{L+1}, b{L+1}.
    """
    V, T, E, H = config.vocab_size, config.block_size, config.n_embd, config.n_hidden
    levels = wavenet_levels(T)
    C = torch.randn((V, E), generator=g)  # (V, E)
    layers: list[Layer] = [Embedding(C, name="C")]  # (B, T, E)
    width = E  # features per position entering the level
    for i in range(1, levels + 1):
        W = torch.randn((2 * width, H), generator=g) / (2 * width) ** 0.5  # (2*width, H)
        layers += [
            FlattenConsecutive(2),  # (B, T/2**i, 2*width), squeezed to (B, 2*width) at the last level
            Linear(W, None, names=(f"W{i}", f"b{i}")),
            BatchNorm1d(torch.ones(H), torch.zeros(H), names=(f"bngain{i}", f"bnbias{i}"),
                        buffer_names=(f"bnmean{i}", f"bnvar{i}"), momentum=BATCHNORM_MOMENTUM),
            Tanh(),
        ]
        width = H
    out = levels + 1
    W_out = torch.randn((H, V), generator=g) / H**0.5 * 0.1  # (H, V) less confident at first
    layers.append(Linear(W_out, torch.zeros(V), names=(f"W{out}", f"b{out}")))  # (B, V)
    return Model(config, Sequential(layers))


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
    # Report the weights averaged over the steps after this fraction of the run (stochastic weight
    # averaging, train.WeightAverage), or None: the last weights, as the lectures do.
    average_from: float | None = None


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(build_mlp, block_size=3, n_embd=10, n_hidden=200, steps=200_000, decay_at=0.5,
                     summary="makemore part 4: embedding, Linear, BatchNorm, tanh, Linear"),
    "deep-mlp": ModelSpec(
        build_deep_mlp, block_size=3, n_embd=10, n_hidden=100, steps=200_000, decay_at=0.75,
        summary="makemore part 3: embedding, 5 x (Linear, BatchNorm, tanh), Linear, BatchNorm",
    ),
    "wavenet": ModelSpec(
        build_wavenet, block_size=8, n_embd=24, n_hidden=128, steps=200_000, decay_at=0.75,
        summary="makemore part 5: embedding, 3 x (flatten pairs, Linear, BatchNorm, tanh), Linear",
        average_from=0.75,  # the lr = 0.01 phase: val 1.9825 against 1.9918 for the last weights
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
