"""Layers over the ops, and the containers that compose them.

    layers.py      Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh: each owns its parameters,
                   buffers and the cache of its last forward pass
    containers.py  Sequential, and Residual (x + branch(x): the two paths' gradients summed)
"""

from backprop_ninja.nn.containers import Residual, Sequential
from backprop_ninja.nn.layers import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Tanh

__all__ = ["BatchNorm1d", "Embedding", "FlattenConsecutive", "Layer", "Linear", "Residual", "Sequential", "Tanh"]
