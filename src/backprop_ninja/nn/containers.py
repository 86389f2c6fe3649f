"""Containers of layers: Sequential runs its layers in order and their backwards in reverse;
Residual adds a branch to its input and sums the gradients of the two paths.

Gradient policy (backprop_ninja.conventions): a container's backward replaces its grads with the
union of its layers' grads; a tensor used by two branches gets the sum of the two gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from backprop_ninja.nn.layers import BatchNorm1d, Layer


class Sequential(Layer):
    """Layers applied in order; backward applies their backwards in reverse order."""

    def __init__(self, layers: list[Layer]) -> None:
        super().__init__()
        self.layers = layers
        self.params = {k: v for layer in layers for k, v in layer.params.items()}
        self.buffers = {k: v for layer in layers for k, v in layer.buffers.items()}
        if len(self.params) != sum(len(layer.params) for layer in layers):
            raise ValueError("two layers use the same parameter name")

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def leaves(self) -> Iterator[Layer]:
        for layer in self.layers:
            yield from layer.leaves()

    def train(self, mode: bool = True) -> "Sequential":
        self.training = mode
        for layer in [*self.layers, *self.leaves()]:
            layer.training = mode
        return self

    def forward(self, x: Tensor, outs: list[Tensor] | None = None) -> Tensor:
        """Apply the layers in order; if `outs` is given, append each layer's output to it."""
        for layer in self.layers:
            x = layer.forward(x)
            if outs is not None:
                outs.append(x)
        return x

    def backward(self, dout: Tensor, douts: list[Tensor] | None = None) -> Tensor | None:
        """Apply the layers' backwards in reverse order; self.grads := every parameter's gradient.

        If `douts` is given it is filled, in forward order, with the gradient of each layer's
        output: douts[i] = dloss/d(output of layer i), the hand-written side of `check --model`.
        """
        self.grads = {}
        received = []  # gradient of each layer's output, last layer first
        for layer in reversed(self.layers):
            received.append(dout)
            dout = layer.backward(dout)
            self.grads.update(layer.grads)
        if douts is not None:
            douts[:] = received[::-1]
        return dout

    @contextmanager
    def kept_buffers(self) -> Iterator["Sequential"]:
        """Run a training-mode pass that is not a training step: BatchNorm's running statistics
        are put back afterwards, so the model is left exactly as it was."""
        saved = {k: v.clone() for k, v in self.buffers.items()}
        try:
            yield self
        finally:
            for k, v in self.buffers.items():
                v.copy_(saved[k])

    @contextmanager
    def substituted(self, params: dict[str, Tensor]) -> Iterator["Sequential"]:
        """Run the layers on other parameter tensors (e.g. autograd leaves), then put them back.

        BatchNorm buffers are restored too (kept_buffers), so a reference pass leaves the model as it was.
        """
        # the layers' own dicts and the merged ones of containers inside, each dict once
        dicts = list({id(layer.params): layer.params for layer in [*self.layers, *self.leaves()]}.values())
        originals = [dict(d) for d in dicts]
        for d in dicts:
            for name in d:
                d[name] = params[name]
        try:
            with self.kept_buffers():
                yield self
        finally:
            for d, original in zip(dicts, originals):
                d.update(original)

    def calibrate(self, x: Tensor, counts: Tensor | None = None) -> None:
        """Pass x through in eval mode, setting every BatchNorm's buffers to the statistics it sees
        (row i of x counted counts[i] times, when given).

        The pass stops at the last BatchNorm's input, as the lecture's does: no statistic depends
        on what comes after (for the lecture MLP that skips the tanh and the output layer).
        """
        last = max((i for i, layer in enumerate(self.layers) if isinstance(layer, BatchNorm1d)), default=-1)
        for layer in self.layers[: last + 1]:
            if isinstance(layer, BatchNorm1d):
                layer.calibrate(x, counts)
                if layer is self.layers[last]:
                    break
            was_training, layer.training = layer.training, False
            x = layer.forward(x)
            layer.training = was_training

    def __repr__(self) -> str:
        return "Sequential(\n" + "".join(f"  {layer!r}\n" for layer in self.layers) + ")"


class Residual(Layer):
    """out = x + branch(x): x is used twice, so its gradient is the sum of the two paths' gradients.

    The pre-LayerNorm transformer block is two of these; the branch is any layer or container.
    """

    def __init__(self, branch: Layer) -> None:
        super().__init__()
        self.branch = branch
        self.params = branch.params
        self.buffers = branch.buffers

    def leaves(self) -> Iterator[Layer]:
        yield from self.branch.leaves()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch.forward(x)  # (..., H)

    def backward(self, dout: Tensor) -> Tensor:
        # out = x + branch(x): the identity path passes dout through, the branch adds its own
        dx = dout + self.branch.backward(dout)  # (..., H)
        self.grads = self.branch.grads
        return dx

    def __repr__(self) -> str:
        return f"Residual({self.branch!r})"
