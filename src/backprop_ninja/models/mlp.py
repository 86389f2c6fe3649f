"""--model mlp: the network of makemore part 4: embedding, Linear, BatchNorm, tanh, Linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backprop_ninja.models.base import Model, ModelConfig
from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh


@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    """The shape of the lecture MLP and of the deep MLP and wavenet of parts 3 and 5."""

    model: str = "mlp"
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200

    @property
    def hidden_width(self) -> int:
        return self.n_hidden



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


# the layer pattern of build_mlp: embedding -> flatten -> Linear -> BatchNorm -> tanh -> Linear
MLP_LAYERS = (Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear)


def is_lecture_mlp(model: Model) -> bool:
    """Whether the model's layers are the lecture MLP's pattern, which the fused training steps compute."""
    layers = list(getattr(model.net, "layers", ()))
    if tuple(type(layer) for layer in layers) != MLP_LAYERS:
        return False
    _, flatten, linear1, batchnorm, _, linear2 = layers
    if flatten.k != model.config.block_size or len(linear1.params) != 2 or len(linear2.params) != 2:
        return False  # a partial flatten (3-D hidden states) or a Linear without bias
    return batchnorm.params[batchnorm.gain_name].ndim == 2
