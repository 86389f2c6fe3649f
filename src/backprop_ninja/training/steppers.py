"""One training step in three stages, and the fused steps that compute all three at once.

    loss, grads = model.loss_and_grads(Xb, Yb)    # 1. forward and the hand-written backward
    for hook in hooks: hook(step, ...grads...)     # 2. whatever needs the gradients: --verify-every,
                                                   #    diagnostics, later a reduction across processes
    optimizer.step(model.params, grads, lr)        # 3. the update (optim)

The readable path runs the three stages. A fused step (the lecture MLP's torch step in fused.py,
its C step in kernel.py; the C step of a stack of layers in stack_kernel.py, for deep-mlp and
wavenet; the C step of makemore's models of whole words with AdamW in sequence_kernel.py) computes forward,
backward and the update in one call, folding the update into the backward: nothing can run between
them. Each declares what it supports; `choose` takes one only where it applies (the lecture MLP or
a stack of Embedding, FlattenConsecutive, Linear, BatchNorm1d and Tanh layers with SGD without
weight decay; bigram, rnn, gru and bow over whole words with AdamW; one process) and where
it is the faster step at the batch's work, and the run records which one ran (run.json's `stepper`),
since each rounds differently.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from backprop_ninja.models import Model, is_lecture_mlp
from backprop_ninja.optim import SGD, AdamW, Optimizer
from backprop_ninja.training import fused, kernel, sequence_kernel, stack_kernel

EAGER = "eager"  # the readable three-stage step


class FusedStep(Protocol):
    """Forward, backward and update in one call. May also have `steps(Xs, Ys, lrs) -> Tensor`, many
    steps in one call (kernel.KernelMLPStepper); the loop then uses it between checked steps."""

    name: str

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One step in place on the model; returns the loss (0-d)."""
        ...


def fused_supports(model: Model, optimizer: Optimizer, processes: int = 1) -> str | None:
    """Why no fused step applies (None: one does). They compute the lecture MLP, or a stack of layers
    (stack_kernel.layer_stack: deep-mlp, wavenet), with plain SGD, or makemore's models of whole
    words (sequence_kernel.sequence_parts: bigram, rnn, gru, bow) with AdamW, alone."""
    if sequence_kernel.is_sequence_model(model):
        if type(optimizer) is not AdamW:
            return "the optimizer is not AdamW, which the C step of a model of whole words runs"
        return "the gradients are reduced across processes" if processes != 1 else None
    if not is_lecture_mlp(model):
        stack = stack_kernel.layer_stack(model)
        if isinstance(stack, str):
            return f"the model is neither the lecture MLP nor a stack of layers with a C step ({stack})"
    if not isinstance(optimizer, SGD) or optimizer.weight_decay:
        return "the optimizer is not plain SGD"
    if processes != 1:
        return "the gradients are reduced across processes"
    return None


def choose(model: Model, optimizer: Optimizer, batch_size: int, fast: bool = True) -> FusedStep | None:
    """The fused step `train` uses, where one applies and `fast`; None for the three-stage step.

    The lecture MLP: its C step where it runs its AVX2 code, else the fused torch step. A stack of
    layers: its C step where it runs its AVX2 code and wins at this batch's work per step
    (stack_kernel.c_step_wins, from measurements); else the three stages on torch's threads. A model
    of whole words: its C step where it runs its AVX2 code (docs/speed.md has the measurements);
    else the three stages.
    """
    if not fast or fused_supports(model, optimizer) is not None:
        return None
    if sequence_kernel.is_sequence_model(model):
        return sequence_kernel.make_sequence_stepper(model, optimizer, batch_size) if (
            sequence_kernel.sequence_kernel_is_fast()) else None
    if is_lecture_mlp(model):
        step = kernel.make_kernel_stepper(model, batch_size) if kernel.kernel_is_fast() else None
        return step or fused.FastMLPStepper(model, batch_size)
    if stack_kernel.stack_kernel_is_fast() and stack_kernel.c_step_wins(model, batch_size):
        return stack_kernel.make_stack_stepper(model, batch_size)
    return None


def step_name(step: FusedStep | None) -> str:
    return EAGER if step is None else step.name
