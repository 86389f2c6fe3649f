"""One training step in three stages, and the fused steps that compute all three at once.

    loss, grads = model.loss_and_grads(Xb, Yb)    # 1. forward and the hand-written backward
    for hook in hooks: hook(step, ...grads...)     # 2. whatever needs the gradients: --verify-every,
                                                   #    diagnostics, later a reduction across processes
    optimizer.step(model.params, grads, lr)        # 3. the update (optim)

The readable path runs the three stages. A fused step (the lecture MLP's torch step in fused.py,
its C step in kernel.py) computes forward, backward and an SGD update in one call, folding the
update into the backward: nothing can run between them. Each declares what it supports; `choose`
takes one only where it applies (the lecture MLP, SGD without weight decay, one process), and the
run records which one ran (run.json's `stepper`), since each rounds differently.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from backprop_ninja.models import Model, is_lecture_mlp
from backprop_ninja.optim import SGD, Optimizer
from backprop_ninja.training import fused, kernel

EAGER = "eager"  # the readable three-stage step


class FusedStep(Protocol):
    """Forward, backward and update in one call. May also have `steps(Xs, Ys, lrs) -> Tensor`, many
    steps in one call (kernel.KernelMLPStepper); the loop then uses it between checked steps."""

    name: str

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One step in place on the model; returns the loss (0-d)."""
        ...


def fused_supports(model: Model, optimizer: Optimizer, processes: int = 1) -> str | None:
    """Why no fused step applies (None: they do). They compute the lecture MLP with plain SGD, alone."""
    if not is_lecture_mlp(model):
        return "the model is not the lecture MLP"
    if not isinstance(optimizer, SGD) or optimizer.weight_decay:
        return "the optimizer is not plain SGD"
    if processes != 1:
        return "the gradients are reduced across processes"
    return None


def choose(model: Model, optimizer: Optimizer, batch_size: int, fast: bool = True) -> FusedStep | None:
    """The fused step `train` uses: the C step where it runs its AVX2 code, else the fused torch
    step, where they apply and `fast`; None for the three-stage step."""
    if not fast or fused_supports(model, optimizer) is not None:
        return None
    step = kernel.make_kernel_stepper(model, batch_size) if kernel.kernel_is_fast() else None
    return step or fused.FastMLPStepper(model, batch_size)


def step_name(step: FusedStep | None) -> str:
    return EAGER if step is None else step.name
