"""--model deep-mlp: the deep network of makemore part 3."""

from __future__ import annotations

import torch

from backprop_ninja.models.base import Model
from backprop_ninja.models.mlp import MLPConfig
from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Sequential, Tanh

TANH_GAIN = 5 / 3  # torch.nn.init.calculate_gain("tanh"): keeps activations' std steady through tanh
DEEP_MLP_BLOCKS = 5  # hidden Linear + BatchNorm + tanh blocks
BATCHNORM_MOMENTUM = 0.1  # the BatchNorm1d of makemore parts 3 and 5


def build_deep_mlp(config: MLPConfig, g: torch.Generator) -> Model:
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
