"""Layers over the ops, and the containers that compose them.

    layers.py      Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh: each owns its parameters,
                   buffers and the cache of its last forward pass
    sequence_layers.py  PositionEmbedding, CausalBoW, RNN, GRU: the sequence models' layers; PackRows,
                   UnpackRows and LiveRows: a pass with targets on the live positions only (ops.packing)
    containers.py  Sequential, and Residual (x + branch(x): the two paths' gradients summed)
    transformer_layers.py  LayerNorm, GELU, CausalSelfAttention, Dropout, Branch, Block: the transformer's
"""

from backprop_ninja.nn.containers import Residual, Sequential
from backprop_ninja.nn.layers import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Tanh
from backprop_ninja.nn.sequence_layers import (
    GRU, RNN, CausalBoW, LiveRows, PackRows, PositionEmbedding, Recurrent, UnpackRows,
)
from backprop_ninja.nn.transformer_layers import GELU, Block, Branch, CausalSelfAttention, Dropout, LayerNorm

__all__ = ["GELU", "GRU", "RNN", "BatchNorm1d", "Block", "Branch", "CausalBoW", "CausalSelfAttention", "Dropout",
           "Embedding", "FlattenConsecutive", "Layer", "LayerNorm", "Linear", "LiveRows", "PackRows",
           "PositionEmbedding", "Recurrent", "Residual", "Sequential", "Tanh", "UnpackRows"]
