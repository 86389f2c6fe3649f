"""The training step of a stack of layers in C (stack_step.c), called through ctypes: deep-mlp, wavenet.

makemore part 3's deep MLP and part 5's wavenet are built of the layer library's Embedding,
FlattenConsecutive, Linear, BatchNorm1d and Tanh. `layer_stack` reads a model's layer list into
blocks (one per Linear, with the BatchNorm and the Tanh that follow it; a FlattenConsecutive only
regroups the rows the next Linear reads); stack_step.c computes the forward, the hand-written
backward and the SGD update of those blocks in one call, in place on the model's own parameter
storage. It agrees with the readable step (`Model.loss_and_grads` + SGD) to float32 rounding;
tests/test_stack_step.py names the tolerances.

Like the lecture MLP's C step (kernel.py) it is an optional extension: without a C compiler the
install succeeds and `train` uses another step (steppers.choose); on a CPU without AVX2 and FMA
it is slow and is not used (`stack_kernel_is_fast`).

    stepper = make_stack_stepper(model, batch_size)   # None when the library or the model does not fit
    loss = stepper.step(Xb, Yb, lr)                    # forward, backward and SGD update, in place
    losses = stepper.steps(Xs, Ys, lrs)                # many steps in one call: (S, B, T), (S, B), S floats
    loss, grads = stepper.step_with_grads(Xb, Yb, lr)  # the same step, its gradients kept too (tests)
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.data import distinct_contexts
from backprop_ninja.models import Model
from backprop_ninja.native import FLOAT_P, float_address, open_library, set_signatures
from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Tanh
from backprop_ninja.training.c_stepper import CStepper, holds_cpu_float32

LIBRARY_STEM = "_stack_step"  # setup.py builds backprop_ninja/training/_stack_step<extension suffix>
ABI = 3  # stack_step_abi(): a library built from another layout of `Stack` or other functions is not loaded
MAX_LAYERS = 16  # stack_step.c's STACK_MAX_LAYERS: Linear layers in one stack
EVAL_ROWS = 256  # contexts per C call in eval mode (stack_logits, stack_calibrate): a step's workspace at this batch


class LayerPlan(ctypes.Structure):
    """stack_step.c's `Layer`: one Linear with the BatchNorm and Tanh that follow it."""

    _fields_ = [
        ("P", ctypes.c_int64), ("I", ctypes.c_int64), ("N", ctypes.c_int64),
        ("batchnorm", ctypes.c_int64), ("tanh", ctypes.c_int64),
        ("weight", FLOAT_P), ("b", FLOAT_P), ("gain", FLOAT_P), ("bias", FLOAT_P),
        ("running_mean", FLOAT_P), ("running_var", FLOAT_P),
        ("momentum", ctypes.c_float), ("eps", ctypes.c_float),
        ("dweight", FLOAT_P), ("db", FLOAT_P), ("dgain", FLOAT_P), ("dbias", FLOAT_P),
    ]


class StackPlan(ctypes.Structure):
    """stack_step.c's `Stack`: the embedding and the layers, with the addresses of their tensors."""

    _fields_ = [
        ("T", ctypes.c_int64), ("E", ctypes.c_int64), ("V", ctypes.c_int64), ("L", ctypes.c_int64),
        ("C", FLOAT_P), ("dC", FLOAT_P), ("layers", LayerPlan * MAX_LAYERS),
    ]


# ---------------------------------------------------------------------------------------------
# the model's layers as blocks


class Block(NamedTuple):
    """One Linear and what follows it up to the next Linear or FlattenConsecutive."""

    linear: Linear
    batchnorm: BatchNorm1d | None
    tanh: bool
    positions: int  # P: rows per example the Linear sees (the wavenet's 3-D inputs: P > 1)


class LayerStack(NamedTuple):
    embedding: Embedding
    blocks: tuple[Block, ...]


def layer_stack(model: Model) -> LayerStack | str:
    """The model's layers as an embedding and blocks the C step computes, or why they are not.

    Embedding -> [FlattenConsecutive] -> Linear [-> BatchNorm1d] [-> Tanh] -> ... ending in (B, V)
    logits for the model's cross-entropy. Exact layer types only: a subclass may compute otherwise.
    """
    if type(model) is not Model:  # a model family with its own loss (e.g. over every position)
        return f"the {type(model).__name__} model has its own loss"
    layers = list(getattr(model.net, "layers", None) or [])
    if not layers or type(layers[0]) is not Embedding:
        return "the model does not start with an Embedding"
    embedding = layers[0]
    table = embedding.params[embedding.name]  # (V, E)
    if table.ndim != 2:
        return "the embedding table is not 2-D"
    V, E = table.shape
    positions, width = model.config.block_size, E  # the (B, P, width) tensor between layers
    blocks: list[Block] = []
    for layer in layers[1:]:
        kind = type(layer)
        last = blocks[-1] if blocks else None
        if kind is FlattenConsecutive:
            if positions % layer.k:
                return f"FlattenConsecutive({layer.k}) of {positions} positions"
            positions, width = positions // layer.k, width * layer.k
        elif kind is Linear:
            weight = layer.params[layer.w_name]  # (I, N)
            bias = layer.params.get(layer.b_name)  # (N,) or None
            if weight.ndim != 2 or weight.shape[0] != width or (bias is not None and bias.shape != weight.shape[1:]):
                return f"the Linear {layer.w_name} does not fit its input"
            width = weight.shape[1]
            blocks.append(Block(layer, None, False, positions))
        elif kind is BatchNorm1d:
            if last is None or last.batchnorm is not None or last.tanh or last.linear.params[
                    last.linear.w_name].shape[1] != width:
                return "a BatchNorm1d that does not directly follow a Linear"
            tensors = [*layer.params.values(), *layer.buffers.values()]
            if any(t.numel() != width or t.shape[-1] != width for t in tensors):
                return f"the BatchNorm1d {layer.gain_name} does not fit its input"
            blocks[-1] = last._replace(batchnorm=layer)
        elif kind is Tanh:
            if last is None or last.tanh or last.linear.params[last.linear.w_name].shape[1] != width:
                return "a Tanh that does not follow a Linear or its BatchNorm1d"
            blocks[-1] = last._replace(tanh=True)
        else:
            return f"the {kind.__name__} layer has no C code"
    if not blocks or positions != 1 or width != V or blocks[-1].tanh:
        return "the layers do not end in (B, V) logits from a Linear"
    if len(blocks) > MAX_LAYERS:
        return f"more than {MAX_LAYERS} Linear layers"
    return LayerStack(embedding, tuple(blocks))


def is_layer_stack(model: Model) -> bool:
    """Whether the C stack step computes this model (its layer pattern, not its name)."""
    return not isinstance(layer_stack(model), str)


# ---------------------------------------------------------------------------------------------
# the library


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built step library, or None when the install could not compile it (or it is stale)."""
    lib = open_library(Path(__file__).resolve().parent, LIBRARY_STEM, "stack_step_abi", ABI)
    if lib is None:
        return None
    plan_p = ctypes.POINTER(StackPlan)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return set_signatures(lib, {
        "stack_workspace_floats": ([plan_p, i64], i64),
        "stack_step": ([plan_p, ptr, ptr, i64, ctypes.c_float, ptr], ctypes.c_float),
        "stack_steps": ([plan_p, ptr, ptr, i64, i64, ptr, ptr, ptr], None),
        "stack_logits": ([plan_p, ptr, i64, ptr, ptr], ctypes.c_int),
        "stack_calibrate": ([plan_p, ptr, ptr, i64, i64, ptr], ctypes.c_int),
        "stack_step_is_vectorized": ([], ctypes.c_int),
    })


def stack_kernel_available() -> bool:
    """Whether the install built the C stack step."""
    return load_library() is not None


def stack_kernel_is_fast() -> bool:
    """Whether the C stack step runs its AVX2 code here (x86-64 with AVX2 and FMA)."""
    lib = load_library()
    return lib is not None and bool(lib.stack_step_is_vectorized())


def make_stack_stepper(model: Model, batch_size: int) -> "KernelStackStepper | None":
    """The C stack stepper for `model`, or None: no library, another layer pattern, not float32 on the CPU."""
    if load_library() is None or not is_layer_stack(model) or not holds_cpu_float32(model):
        return None
    return KernelStackStepper(model, batch_size)


def eval_logits(model: Model) -> Callable[[Tensor], Tensor] | None:
    """The eval-mode forward pass of a layer stack in C, (N, T) ids -> (N, V) logits, or None where
    the C step would not run (no library, its portable copy, another layer pattern, not float32 on
    the CPU), and the readable `model.logits` is the one to use."""
    stepper = _eval_stepper(model)
    return None if stepper is None else stepper.logits


def eval_calibrate(model: Model) -> Callable[[Tensor], None] | None:
    """`model.calibrate` of a layer stack in C, (N, T) ids -> every BatchNorm's buffers, or None
    where the C step would not run, and `model.calibrate` is the one to use."""
    stepper = _eval_stepper(model)
    return None if stepper is None else stepper.calibrate


def _eval_stepper(model: Model) -> "KernelStackStepper | None":
    return make_stack_stepper(model, EVAL_ROWS) if stack_kernel_is_fast() else None


class KernelStackStepper(CStepper):
    """Forward, hand-written backward and SGD update of a layer stack, in C, in place on the model.

    The plan holds the addresses of the model's tensors: they must stay the same tensors (every
    part of this package updates parameters and buffers in place).
    """

    name = "c-stack"
    what = "C stack step"

    def __init__(self, model: Model, batch_size: int) -> None:
        stack = layer_stack(model)
        assert not isinstance(stack, str), stack
        embedding, blocks = stack
        # where each tensor of the plan lives in the model: name -> (dict, key)
        sources: dict[str, tuple[dict, str]] = {embedding.name: (embedding.params, embedding.name)}
        table = embedding.params[embedding.name]  # (V, E)
        self.plan = StackPlan(T=model.config.block_size, E=table.shape[1], V=table.shape[0], L=len(blocks),
                              C=float_address(table))
        self.param_names = {embedding.name: ("C", None)}  # model name -> (plan field, layer index)
        for i, (linear, batchnorm, tanh, positions) in enumerate(blocks):
            weight = linear.params[linear.w_name]  # (I, N)
            bias = linear.params.get(linear.b_name)  # (N,) or None
            layer = self.plan.layers[i]
            layer.P, layer.I, layer.N = positions, weight.shape[0], weight.shape[1]
            layer.tanh = int(tanh)
            layer.weight, layer.b = float_address(weight), float_address(bias)
            sources[linear.w_name] = (linear.params, linear.w_name)
            self.param_names[linear.w_name] = ("dweight", i)
            if bias is not None:
                sources[linear.b_name] = (linear.params, linear.b_name)
                self.param_names[linear.b_name] = ("db", i)
            if batchnorm is not None:
                layer.batchnorm = 1
                layer.momentum, layer.eps = batchnorm.momentum, batchnorm.eps
                for field, holder, key in (("gain", batchnorm.params, batchnorm.gain_name),
                                           ("bias", batchnorm.params, batchnorm.bias_name),
                                           ("running_mean", batchnorm.buffers, batchnorm.mean_name),
                                           ("running_var", batchnorm.buffers, batchnorm.var_name)):
                    setattr(layer, field, float_address(holder[key]))
                    sources[key] = (holder, key)
                self.param_names[batchnorm.gain_name] = ("dgain", i)
                self.param_names[batchnorm.bias_name] = ("dbias", i)
        self._hold(sources)
        self.plan_ref = ctypes.byref(self.plan)
        self.lib = load_library()
        self._workspace(batch_size)

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One SGD step on the batch (Xb (B, T) int64, Yb (B,) int64); returns the loss (0-d)."""
        self._check_tensors()
        Xb, Yb = self._ids(Xb, Yb, batch_dims=1)
        loss = self.lib.stack_step(self.plan_ref, Xb.data_ptr(), Yb.data_ptr(), Yb.shape[0], lr, self.work.data_ptr())
        return torch.scalar_tensor(loss)  # float32 0-d; cheaper than torch.tensor(loss)

    def steps(self, Xs: Tensor, Ys: Tensor, lrs: list[float]) -> Tensor:
        """len(lrs) steps in one call, on the batches Xs (S, B, T), Ys (S, B); returns the losses (S,).

        The same as calling `step` on each batch in turn, bit for bit.
        """
        self._check_tensors()
        Xs, Ys = self._ids(Xs, Ys, batch_dims=2)
        if len(lrs) != Ys.shape[0]:
            raise ValueError(f"{len(lrs)} learning rates for {Ys.shape[0]} batches of steps")
        S, B = Ys.shape
        lr = torch.tensor(lrs, dtype=torch.float32)  # (S,)
        losses = torch.empty(S, dtype=torch.float32)  # (S,)
        self.lib.stack_steps(self.plan_ref, Xs.data_ptr(), Ys.data_ptr(), S, B, lr.data_ptr(), losses.data_ptr(),
                             self.work.data_ptr())
        return losses

    def logits(self, X: Tensor) -> Tensor:
        """Eval-mode logits (N, V) of the contexts X (N, T) int64, each BatchNorm normalising by its
        buffers (stack_step.c's stack_logits), the workspace's batch of rows per call. Changes nothing."""
        self._check_tensors()
        if X.dtype != torch.int64 or X.ndim != 2 or X.shape[1] != self.plan.T:
            raise ValueError(f"contexts {tuple(X.shape)} of {X.dtype} are not (N, {self.plan.T}) int64 ids")
        X = X.contiguous()
        logits = torch.empty(X.shape[0], self.plan.V, dtype=torch.float32)  # (N, V)
        for rows, out in zip(X.split(self.batch_size), logits.split(self.batch_size)):
            if self.lib.stack_logits(self.plan_ref, rows.data_ptr(), rows.shape[0], out.data_ptr(),
                                     self.work.data_ptr()):
                raise ValueError(f"a context holds an id outside the vocabulary of {self.plan.V}")
        return logits

    def calibrate(self, X: Tensor) -> None:
        """Model.calibrate in C (stack_step.c's stack_calibrate): each BatchNorm's buffers become the
        statistics of its input over the contexts X (N, T) int64, the network run once per distinct
        context, weighed by its count."""
        self._check_tensors()
        if X.dtype != torch.int64 or X.ndim != 2 or X.shape[1] != self.plan.T or X.shape[0] < 1:
            raise ValueError(f"contexts {tuple(X.shape)} of {X.dtype} are not (N >= 1, {self.plan.T}) int64 ids")
        contexts = distinct_contexts(X)
        rows, counts = contexts.rows.contiguous(), contexts.counts.contiguous()  # (U, T), (U,)
        if self.lib.stack_calibrate(self.plan_ref, rows.data_ptr(), counts.data_ptr(), rows.shape[0],
                                    self.batch_size, self.work.data_ptr()):
            raise ValueError(f"a context holds an id outside the vocabulary of {self.plan.V}")

    def step_with_grads(self, Xb: Tensor, Yb: Tensor, lr: float) -> tuple[Tensor, dict[str, Tensor]]:
        """`step`, keeping the gradients it applied: (loss, {parameter name: gradient}), for tests."""
        grads = {name: torch.empty_like(self.tensors[name]) for name in self.param_names}
        for name, (field, i) in self.param_names.items():
            setattr(self.plan if i is None else self.plan.layers[i], "dC" if i is None else field,
                    float_address(grads[name]))
        try:
            loss = self.step(Xb, Yb, lr)
        finally:
            for name, (field, i) in self.param_names.items():
                setattr(self.plan if i is None else self.plan.layers[i], "dC" if i is None else field, None)
        return loss, grads

    def _workspace_floats(self, batch_size: int) -> int:
        return self.lib.stack_workspace_floats(self.plan_ref, batch_size)

    def _ids(self, X: Tensor, Y: Tensor, batch_dims: int) -> tuple[Tensor, Tensor]:
        """X and Y as the C step reads them (contiguous int64), with a workspace for their batch size:
        Y (B,) for a step, (S, B) for a chunk of steps (the batch size the workspace is made for)."""
        if X.dtype != torch.int64 or Y.dtype != torch.int64:
            raise TypeError(f"the C step takes int64 ids, not {X.dtype} and {Y.dtype}")
        if Y.ndim != batch_dims or Y.shape[-1] < 1 or X.shape != (*Y.shape, self.plan.T):
            raise ValueError(f"contexts {tuple(X.shape)} do not fit targets {tuple(Y.shape)} "
                             f"and block size {self.plan.T}")
        self._workspace(Y.shape[-1])
        return X.contiguous(), Y.contiguous()  # no copy for the slices train passes


# ---------------------------------------------------------------------------------------------
# where the C step wins

# Multiply-adds per step (batch x forward multiply-adds per example) from which the readable step
# on torch's threads would beat the one-thread C step. Measured (docs/speed.md) at batches 32, 512
# and 4096, torch on 1 and 2 threads, deep-mlp (45,700 per example) and wavenet (126,336): the C
# step was the fastest at every one, up to 5.2e8 a step (wavenet at 4096: 0.6-0.8x the autograd
# step's CPU time, where torch's second thread bought nothing on this shared 2-CPU machine). No
# crossover was found, so none is set; a machine with more cores should measure and set one here.
C_STEP_WINS_BELOW = math.inf


def multiply_adds_per_example(model: Model) -> int:
    """The forward pass's multiply-adds per example in the model's Linear layers (0: not a stack)."""
    stack = layer_stack(model)
    if isinstance(stack, str):
        return 0
    return sum(block.positions * weight.shape[0] * weight.shape[1]
               for block in stack.blocks for weight in [block.linear.params[block.linear.w_name]])


def c_step_wins(model: Model, batch_size: int) -> bool:
    """Whether the C stack step is the faster step for this model at this batch (by work per step)."""
    return batch_size * multiply_adds_per_example(model) < C_STEP_WINS_BELOW
