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


# position embedding (makemore's wpe): out = x + P[:T], one learned vector per position


class PositionEmbeddingCache(NamedTuple):
    positions: int  # T, the rows of P that were added
    num_positions: int  # rows of the table (the block size)


def position_embedding_forward(x: Tensor, table: Tensor) -> tuple[Tensor, PositionEmbeddingCache]:
    """x (B, T, E) token embeddings, table (T_max, E) -> x + table[:T], (B, T, E)."""
    T = x.shape[1]
    if T > table.shape[0]:
        raise ValueError(f"a sequence of {T} positions is longer than the {table.shape[0]} of the position table")
    out = x + table[:T]  # (B, T, E) the (T, E) rows broadcast over the batch
    return out, PositionEmbeddingCache(T, table.shape[0])


def position_embedding_backward(dout: Tensor, cache: PositionEmbeddingCache) -> tuple[Tensor, Tensor]:
    """Returns dx, dtable. In the forward pass this was: out = x + P[:T].

    x passes straight through; row t of P was broadcast over the batch, so it gets the batch's
    sum at position t; the rows past T were not used and get 0.
    """
    dtable = dout.new_zeros(cache.num_positions, dout.shape[-1])  # (T_max, E)
    dtable[: cache.positions] = dout.sum(0)  # (T, E)
    return dout, dtable
