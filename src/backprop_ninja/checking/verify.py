"""`train --verify-every N`: the gradients of a training step against autograd on the same batch.

The check is the package's one verdict (checking.verdict), so a run stops on exactly the gradients
that `check --model` would call wrong.
"""

from __future__ import annotations

from torch import Tensor

from backprop_ninja.checking.verdict import gradient_scale, judge, scale_floor
from backprop_ninja.models import Model


def first_disagreement(model: Model, Xb: Tensor, Yb: Tensor, grads: dict[str, Tensor]) -> str | None:
    """Recompute this batch's gradients with autograd; describe the first parameter whose hand-written
    gradient (`grads`, from this very step) is wrong, or None. The model is left as it was."""
    _, reference = model.autograd_loss_and_grads(Xb, Yb)
    floor = scale_floor(reference.values())
    for name, ref in reference.items():  # the model's parameter order
        grad = grads.get(name)
        if grad is None:
            return f"the backward pass gave no gradient for {name}"
        verdict = judge(grad, ref, gradient_scale(ref, floor))
        if not verdict.right:
            return f"d{name} disagrees with autograd: it {verdict.reason}"
    return None
