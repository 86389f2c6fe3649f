"""--model wavenet: the hierarchical network of makemore part 5."""

from __future__ import annotations

import torch

from backprop_ninja.errors import UserError
from backprop_ninja.models.base import Model
from backprop_ninja.models.deep_mlp import BATCHNORM_MOMENTUM
from backprop_ninja.models.mlp import MLPConfig
from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Sequential, Tanh


def wavenet_levels(block_size: int) -> int:
    """How many FlattenConsecutive(2) levels fuse `block_size` positions into one: log2(block_size)."""
    if block_size < 2 or block_size & (block_size - 1):
        raise UserError(
            f"wavenet fuses pairs of positions level by level, so --block-size must be a power of two "
            f">= 2 (8 gives the lecture's three levels), got {block_size}"
        )
    return block_size.bit_length() - 1


def build_wavenet(config: MLPConfig, g: torch.Generator) -> Model:
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
