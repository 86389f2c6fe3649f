"""Embedding lookup and its backward, a scatter-add. Conventions: backprop_ninja.conventions."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# embedding: emb = C[X]


class EmbeddingCache(NamedTuple):
    idx: Tensor  # (B, T) int64 token ids that were looked up
    num_embeddings: int  # V, rows of the table


def embedding_forward(idx: Tensor, table: Tensor) -> tuple[Tensor, EmbeddingCache]:
    out = table[idx]  # (B, T, E)
    return out, EmbeddingCache(idx, table.shape[0])


def embedding_backward(dout: Tensor, cache: EmbeddingCache) -> Tensor:
    """Returns dtable. In the forward pass this was: emb = C[X].

    Every row of C that was looked up k times receives the sum of those k gradients:
    a scatter-add, vectorised with index_add_ (no Python loop over the batch).
    """
    width = dout.shape[-1]
    dtable = dout.new_zeros(cache.num_embeddings, width)  # (V, E)
    dtable.index_add_(0, cache.idx.reshape(-1), dout.reshape(-1, width))  # (V, E)
    return dtable
