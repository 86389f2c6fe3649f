"""Layers over the ops, and the containers that compose them.

    layers.py      Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh: each owns its parameters,
                   buffers and the cache of its last forward pass
    containers.py  Sequential (and, for residual branches, containers that sum a shared tensor's gradients)
"""

from backprop_ninja.nn.containers import Sequential
from backprop_ninja.nn.layers import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Tanh

__all__ = ["BatchNorm1d", "Embedding", "FlattenConsecutive", "Layer", "Linear", "Sequential", "Tanh"]
