"""Hand-written optimizers: the third stage of a training step, with a state a checkpoint can hold.

    optimizer.step(params, grads, lr)   # in place on the parameters; the model's gradients are not kept
    optimizer.state_dict()              # name -> tensor, saved beside the model (may be empty)
    optimizer.load_state_dict(state)
    grads, norm = clip_grad_norm(grads, max_norm)   # --clip-grad-norm, before the update

A new optimizer: a module here and one entry in OPTIMIZERS (docs/architecture.md).
"""

from __future__ import annotations

from backprop_ninja.errors import UserError
from backprop_ninja.optim.adamw import AdamW
from backprop_ninja.optim.clipping import clip_grad_norm, global_norm
from backprop_ninja.optim.sgd import SGD, Optimizer

OPTIMIZERS: dict[str, type] = {"sgd": SGD, "adamw": AdamW}


def make_optimizer(name: str, params, **settings) -> Optimizer:
    try:
        kind = OPTIMIZERS[name]
    except KeyError:
        raise UserError(f"unknown optimizer {name!r}; known optimizers: {', '.join(sorted(OPTIMIZERS))}") from None
    return kind(params, **settings)


__all__ = ["OPTIMIZERS", "SGD", "AdamW", "Optimizer", "clip_grad_norm", "global_norm", "make_optimizer"]
