"""Layers of the sequence models (makemore's bigram, rnn, gru, bow): each reads (B, T, ...) and keeps
the positions apart where it must.

    PositionEmbedding   x + P[:T], one learned vector per position
    LiveRows            the packing of a pass over a batch with targets (ops.packing), shared by the layers below
    PackRows, UnpackRows  (B, T, ...) <-> the live positions' rows (R, ...); the identity unpacked
    CausalBoW           each position averages itself and the positions before it
    RNN, GRU            a learned start state, then the cell over every position (ops.recurrent;
                        in C, ops.native_recurrent, on contiguous float32 CPU tensors outside autograd)

RNN and GRU also keep, after a backward pass, dL/dh_t of every step (`dh`, (B, T, H)) and the
part of it that came from the step's own output (`dout`): the training diagnostics plot its norm
through time, and `check --model` prints a row per step
(`inner_outputs` and `inner_grads`), so a backpropagation-through-time bug shows where it enters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.nn.layers import Layer
from backprop_ninja.ops import native_recurrent, packing


class PositionEmbedding(Layer):
    """out = x + P[:T]: (B, T, E) -> (B, T, E)."""

    def __init__(self, table: Tensor, name: str = "P") -> None:
        super().__init__()
        self.name = name
        self.params = {name: table}

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = ops.position_embedding_forward(x, self.params[self.name])  # (B, T, E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        dx, dtable = ops.position_embedding_backward(dout, self.cache)  # (B, T, E), (T_max, E)
        self.grads = {self.name: dtable}
        return dx


class LiveRows:
    """The packing (ops.packing.Packing) of the pass under way (a training step, or a split's loss),
    or None: the one object the layers that move between (B, T, ...) and the live rows (R, ...)
    read, so that the model sets it once a pass. Outside a packed pass (sampling, logits without
    targets, a layer run on its own) they are the identity."""

    def __init__(self) -> None:
        self.packing: packing.Packing | None = None

    @contextmanager
    def packed(self, live: packing.Packing) -> Iterator[packing.Packing]:
        self.packing = live
        try:
            yield live
        finally:
            self.packing = None


class Repacking(Layer):
    """A move between (B, T, ...) and a packed pass's live rows (R, ...) by an op pair of ops.packing;
    the identity outside a packed pass."""

    op_forward = op_backward = None  # the pair, each subclass its own

    def __init__(self, live: LiveRows) -> None:
        super().__init__()
        self.live = live

    def forward(self, x: Tensor) -> Tensor:
        if self.live.packing is None:
            self.cache = None
            return x
        out, self.cache = type(self).op_forward(x, self.live.packing)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return dout if self.cache is None else type(self).op_backward(dout, self.cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PackRows(Repacking):
    """(B, T, ...) -> the live positions' rows (R, ...): rows = x[live]; backward: zeros at the dead positions."""

    op_forward, op_backward = staticmethod(packing.pack_forward), staticmethod(packing.pack_backward)


class UnpackRows(Repacking):
    """The live rows (R, ...) -> (B, T, ...): out[live] = rows, zeros elsewhere; backward: the live rows of dout."""

    op_forward, op_backward = staticmethod(packing.unpack_forward), staticmethod(packing.unpack_backward)


class CausalBoW(Layer):
    """out[:, t] = x[:, :t+1].mean(1): (B, T, E) -> (B, T, E)."""

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = ops.causal_bow_forward(x)  # (B, T, E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return ops.causal_bow_backward(dout, self.cache)  # (B, T, E)

    def __repr__(self) -> str:
        return "CausalBoW()"


class Recurrent(Layer):
    """A recurrent cell over every position from a learned (1, H) start state: (B, T, E) -> (B, T, H).

    Parameter names: the start state's, then the cell's weights and biases in the op's order.
    The ops are native_recurrent's: the C loop where the tensors allow it, else ops.recurrent's
    (float64 in `check --model`, autograd's reference pass, CUDA).
    """

    forward_op = staticmethod(native_recurrent.rnn_forward)
    backward_op = staticmethod(native_recurrent.rnn_backward)

    def __init__(self, start: Tensor, weights: dict[str, Tensor], start_name: str = "start") -> None:
        super().__init__()
        self.start_name = start_name
        self.params = {start_name: start, **weights}

    def forward(self, x: Tensor) -> Tensor:
        start, *weights = self.params.values()
        out, self.cache = self.forward_op(x, start, *weights)  # (B, T, H)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        dx, dstart, *dweights, self.dh = self.backward_op(dout, self.cache)  # (B, T, E), (1, H), ..., (B, T, H)
        self.dout = dout  # (B, T, H) the part of dh that came from each step's own output
        self.grads = dict(zip(self.params, [dstart, *dweights]))
        return dx

    def inner_outputs(self) -> dict[str, Tensor]:
        """h_t of every step of the last forward pass, last step first (backward order)."""
        states = self.cache.states
        return {f"h[{t}]": states[t] for t in reversed(range(len(states)))}

    def inner_grads(self) -> dict[str, Tensor]:
        """dL/dh_t of every step of the last backward pass, keyed as inner_outputs."""
        return {f"h[{t}]": self.dh[:, t] for t in reversed(range(self.dh.shape[1]))}

    def __repr__(self) -> str:
        names = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({names})"


class RNN(Recurrent):
    """makemore's RNN cell: h_t = tanh([x_t, h_{t-1}] @ W + b)."""


class GRU(Recurrent):
    """makemore's GRU cell (ops.recurrent): reset and update gates, a candidate state, their blend."""

    forward_op = staticmethod(native_recurrent.gru_forward)
    backward_op = staticmethod(native_recurrent.gru_backward)
