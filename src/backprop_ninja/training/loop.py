"""The training loop: the lecture's Exercise 4, with every gradient from the hand-written backward.

    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g)                       # draws the initial values from g ...
    for i in range(steps):
        ix = torch.randint(0, Ntrain, (B,), generator=g)     # ... and then the batches, as the lecture
        loss, grads = model.loss_and_grads(Xtr[ix], Ytr[ix]) # 1. forward, hand-written backward
        hooks(i, grads)                                      # 2. --verify-every, diagnostics
        optimizer.step(model.params, grads, lr)              # 3. the update
    model.calibrate(Xtr)                                 # BatchNorm statistics of the whole train split

It builds no autograd graph, and it never waits on a single step's loss: losses go into a
preallocated tensor that is read only every SYNC_EVERY steps (progress, NaN check, checkpoint).
The batch indices of those SYNC_EVERY steps are drawn in one call, `torch.randint(0, Ntrain,
(SYNC_EVERY, B), generator=g)`, which gives the very numbers of SYNC_EVERY per-step draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from backprop_ninja.checking.verify import first_disagreement
from backprop_ninja.errors import UserError
from backprop_ninja.models import Model
from backprop_ninja.optim import Optimizer, clip_grad_norm
from backprop_ninja.training.averaging import SNAPSHOT_EVERY, WeightAverage
from backprop_ninja.training.progress import Progress
from backprop_ninja.training.signals import StopFlag
from backprop_ninja.training.steppers import FusedStep

# steps between reads of the losses (progress bar, NaN check, Ctrl-C checkpoint); the chunks end where
# the weight average takes its snapshots
SYNC_EVERY = SNAPSHOT_EVERY
SAVE_EVERY = 10_000  # periodic checkpoint; a multiple of SYNC_EVERY


class TrainingStopped(UserError):
    """Training stopped on a failed check (gradients disagree, loss not finite): exit 1, one line."""

    exit_code = 1


class Hook(Protocol):
    """Stage 2 of a step: runs on the step's gradients before the update, on the steps it is due."""

    every: int

    def __call__(self, step: int, Xb: Tensor, Yb: Tensor, grads: dict[str, Tensor], lr: float) -> list[str]:
        """May raise TrainingStopped; returns warning lines to show (usually none). A hook may also
        have after_update(step, params) -> list[str], called on the same steps after stage 3."""
        ...


class Schedule(NamedTuple):
    """The recipe's learning rate: lr, then lr/10 from step decay_step on (the lecture's step decay)."""

    lr: float
    decay_step: int

    def at(self, step: int) -> float:
        """`lr = 0.1 if i < 100000 else 0.01` for the lecture's 200000 steps."""
        return self.lr if step < self.decay_step else self.lr / 10


def next_checked(step: int, end: int, hooks: list[Hook]) -> int:
    """The first step in [step, end) on which a hook is due; end if none."""
    return min([end] + [step + (-step) % hook.every for hook in hooks])


def check_finite(losses: Tensor, start: int, stop: int) -> None:
    """Raise naming the first step in [start, stop) whose loss is NaN or infinite."""
    bad = ~torch.isfinite(losses[start:stop])  # (stop - start,)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0, 0])
        raise TrainingStopped(f"the loss is {losses[first].item()} at step {first}; training stopped")


def train_steps(
    model: Model,
    optimizer: Optimizer,
    fused: FusedStep | None,
    X: Tensor,
    Y: Tensor,
    g: torch.Generator,
    losses: Tensor,
    schedule: Schedule,
    batch_size: int,
    start_step: int,
    *,
    hooks: list[Hook] = (),
    save: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
    average: WeightAverage | None = None,
    clip: float | None = None,
) -> int:
    """Train from start_step up to len(losses); return the step reached (less on a stop request).

    X, Y: (N, T), (N,) the training split. losses: (steps,) float32, filled in as steps run.
    `fused`, where given, runs every step on which no hook is due (a fused step shows no gradients;
    on a hooked step the hooks get the readable path's, computed with BatchNorm's running statistics
    kept, then the fused step runs). `save(step)` is called every SAVE_EVERY steps, only after the
    losses so far are known finite. `average` takes its snapshots at the ends of chunks.
    """
    steps = losses.shape[0]
    n_train = X.shape[0]
    step = start_step
    hooks = list(hooks)
    run_chunk = getattr(fused, "steps", None)  # a fused step that takes many steps in one call (the C step)
    with torch.no_grad():
        while step < steps:
            start = step
            # One chunk of steps up to the next multiple of SYNC_EVERY: its batch indices drawn in one
            # call (the same stream as one (B,) draw per step) and its losses read once at its end.
            end = min(steps, (step // SYNC_EVERY + 1) * SYNC_EVERY)
            g_before = g.get_state()
            ix = torch.randint(0, n_train, (end - step, batch_size), generator=g)  # (steps, B)
            Xc, Yc = X[ix], Y[ix]  # (steps, B, T), (steps, B)
            while step < end and not (stop is not None and stop.requested):
                upto = next_checked(step, end, hooks) if fused is not None else step
                if upto > step and run_chunk is not None:  # the unhooked steps, in one call
                    i, j = step - start, upto - start
                    losses[step:upto] = run_chunk(Xc[i:j], Yc[i:j], [schedule.at(s) for s in range(step, upto)])
                    step = upto
                    continue
                Xb, Yb = Xc[step - start], Yc[step - start]  # (B, T), (B,)
                lr = schedule.at(step)
                due = [hook for hook in hooks if step % hook.every == 0]
                if fused is not None and not due:
                    losses[step] = fused.step(Xb, Yb, lr)
                elif fused is not None:
                    with model.net.kept_buffers():
                        _, grads = model.loss_and_grads(Xb, Yb)
                    _run_hooks(due, step, Xb, Yb, grads, lr, progress)
                    losses[step] = fused.step(Xb, Yb, lr)
                    _run_after_update(due, step, model.params, progress)
                else:
                    loss, grads = model.loss_and_grads(Xb, Yb)  # 1
                    _run_hooks(due, step, Xb, Yb, grads, lr, progress)  # 2
                    if clip is not None:
                        grads, _ = clip_grad_norm(grads, clip)
                    optimizer.step(model.params, grads, lr)  # 3
                    _run_after_update(due, step, model.params, progress)
                    losses[step] = loss
                step += 1
            if step < end:  # stopped early: leave the generator where the steps done have left it
                g.set_state(g_before)
                torch.randint(0, n_train, (step - start, batch_size), generator=g)
            check_finite(losses, start, step)
            if average is not None:
                average.observe(step, model.params)
            if progress is not None:
                progress.update(start, step, losses)
            if save is not None and step % SAVE_EVERY == 0 and step < steps:
                save(step)
            if stop is not None and stop.requested:
                break
    return step


def _run_hooks(due: list[Hook], step: int, Xb: Tensor, Yb: Tensor, grads: dict[str, Tensor], lr: float,
               progress: Progress | None) -> None:
    for hook in due:
        for warning in hook(step, Xb, Yb, grads, lr):
            (progress.write if progress is not None else print)(warning)


def _run_after_update(due: list[Hook], step: int, params: dict[str, Tensor], progress: Progress | None) -> None:
    """The hooks that look at what the update did (Hook.after_update, optional)."""
    for hook in due:
        for warning in getattr(hook, "after_update", lambda step, params: [])(step, params):
            (progress.write if progress is not None else print)(warning)


class VerifyHook:
    """--verify-every N: this step's gradients against autograd on the same batch (checking.verify)."""

    def __init__(self, model: Model, every: int) -> None:
        self.model, self.every = model, every

    def __call__(self, step: int, Xb: Tensor, Yb: Tensor, grads: dict[str, Tensor], lr: float) -> list[str]:
        problem = first_disagreement(self.model, Xb, Yb, grads)
        if problem is not None:
            raise TrainingStopped(f"gradient check failed at step {step}: {problem}")
        return []
