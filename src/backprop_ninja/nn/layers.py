"""Thin layer classes over the forward/backward pairs of `ops`, in the style of makemore part 3/5.

A layer owns its parameters (named, so a model can use the lectures' names: C, W1, bngain, ...),
its buffers (BatchNorm statistics) and the cache of its last forward pass:

    y = layer.forward(x)        # remembers what its backward needs
    dx = layer.backward(dy)     # returns dx, and sets layer.grads = {param name: gradient}

Gradient policy: the one of `ops` (fresh tensors, never accumulated). Each backward *replaces*
layer.grads, so one forward/backward pair gives exactly one step's gradients with no zero_grad().
Containers (nn.containers) run the layers' backwards in reverse order and merge their grads.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.conventions import BATCHNORM_EPS


class Layer:
    """Base class: no parameters, no buffers, training mode on."""

    def __init__(self) -> None:
        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.training = True

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, dout: Tensor) -> Tensor | None:
        raise NotImplementedError

    def leaves(self) -> Iterator["Layer"]:
        """The layers that own parameters or caches: this one, or a container's own, recursively."""
        yield self

    def __repr__(self) -> str:
        names = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({names})"


class Embedding(Layer):
    """emb = C[X]: (B, T) token ids -> (B, T, E) vectors."""

    def __init__(self, table: Tensor, name: str = "C") -> None:
        super().__init__()
        self.name = name
        self.params = {name: table}

    def forward(self, idx: Tensor) -> Tensor:
        out, self.cache = ops.embedding_forward(idx, self.params[self.name])  # (B, T, E)
        return out

    def backward(self, dout: Tensor) -> None:
        self.grads = {self.name: ops.embedding_backward(dout, self.cache)}
        return None  # token ids have no gradient


class FlattenConsecutive(Layer):
    """(B, T, E) -> (B, T/k, k*E), squeezed to (B, k*E) when one group is left (makemore part 5)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = ops.flatten_consecutive_forward(x, self.k)  # (B, T/k, k*E)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return ops.flatten_consecutive_backward(dout, self.cache)  # (B, T, E)

    def __repr__(self) -> str:
        return f"FlattenConsecutive({self.k})"


class Linear(Layer):
    """out = x @ W + b, with W of shape (fan_in, fan_out) as in the lectures.

    `kernels` is where the layer finds its linear_forward and linear_backward: the readable ops by
    default; the transformer gives ops.native_transformer, whose products run in C where they can."""

    def __init__(self, weight: Tensor, bias: Tensor | None, names: tuple[str, str] = ("W", "b"),
                 kernels: ModuleType = ops) -> None:
        super().__init__()
        self.w_name, self.b_name = names
        self.params = {self.w_name: weight}
        if bias is not None:
            self.params[self.b_name] = bias
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.params[self.w_name], self.params.get(self.b_name)
        out, self.cache = self.kernels.linear_forward(x, w, b)  # (..., fan_out)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        dx, dw, db = self.kernels.linear_backward(dout, self.cache)
        self.grads = {self.w_name: dw}
        if db is not None:
            self.grads[self.b_name] = db
        return dx


class BatchNorm1d(Layer):
    """BatchNorm over (B, H) or (B, T, H) inputs: batch statistics when training, buffers in eval.

    Training uses the unbiased batch variance (Bessel's correction) as the lectures do, and keeps
    running averages: running = (1 - momentum) * running + momentum * batch.
    """

    def __init__(
        self,
        gain: Tensor,
        bias: Tensor,
        names: tuple[str, str] = ("gamma", "beta"),
        buffer_names: tuple[str, str] = ("running_mean", "running_var"),
        momentum: float = 0.1,
        eps: float = BATCHNORM_EPS,
    ) -> None:
        super().__init__()
        self.gain_name, self.bias_name = names
        self.mean_name, self.var_name = buffer_names
        self.momentum, self.eps = momentum, eps
        self.params = {self.gain_name: gain, self.bias_name: bias}
        self.buffers = {
            self.mean_name: torch.zeros_like(gain),  # shaped like gain, broadcasts like it
            self.var_name: torch.ones_like(gain),
        }

    def forward(self, x: Tensor) -> Tensor:
        gain, bias = self.params[self.gain_name], self.params[self.bias_name]
        if not self.training:
            mean, var = self.buffers[self.mean_name], self.buffers[self.var_name]
            return ops.batchnorm_inference(x, gain, bias, mean, var, self.eps)  # (B, H)
        out, self.cache, stats = ops.batchnorm_forward(x, gain, bias, self.eps)  # (B, H)
        # running += momentum * (batch - running): the lectures' (1 - momentum) * running +
        # momentum * batch as one fused in-place op (as fast.py does; the two round differently in
        # the last bit). In place: the model's buffers dict holds these very tensors, which keep
        # their dtype when a check runs float64 parameters through a float32 model.
        with torch.no_grad():
            for name, batch_stat in ((self.mean_name, stats.mean), (self.var_name, stats.var)):
                running = self.buffers[name]  # shaped like gain
                running.lerp_(batch_stat.reshape(running.shape).to(running.dtype), self.momentum)
        return out

    def calibrate(self, x: Tensor, counts: Tensor | None = None) -> None:
        """Set the buffers to the exact statistics of x (e.g. the whole training set).

        counts (N,): row i of x stands for counts[i] identical rows (see data.distinct_contexts).
        """
        dims = ops.batchnorm_dims(x)
        shape = self.params[self.gain_name].shape
        if counts is None:
            mean, var = x.mean(dims), x.var(dims, unbiased=True)  # (H,), (H,)
        else:
            w = counts.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))  # (N, 1) or (N, 1, 1)
            n = counts.sum().item() * (x[0].numel() // x.shape[-1])  # samples per feature
            mean = (w * x).sum(dims) / n  # (H,)
            var = (w * (x - mean) ** 2).sum(dims) / (n - 1)  # (H,) unbiased, as the lecture's
        self.buffers[self.mean_name].copy_(mean.reshape(shape))
        self.buffers[self.var_name].copy_(var.reshape(shape))

    def backward(self, dout: Tensor) -> Tensor:
        dx, dgain, dbias = ops.batchnorm_backward(dout, self.cache)
        self.grads = {self.gain_name: dgain, self.bias_name: dbias}
        return dx


class Tanh(Layer):
    def forward(self, x: Tensor) -> Tensor:
        out, self.cache = ops.tanh_forward(x)  # (..., H)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        return ops.tanh_backward(dout, self.cache)

    def __repr__(self) -> str:
        return "Tanh()"
