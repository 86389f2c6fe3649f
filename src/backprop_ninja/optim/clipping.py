"""Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_ computes it, on a step's gradients.

    total = sqrt(sum over every parameter of ||grad||^2)
    if total > max_norm: every grad *= max_norm / (total + 1e-6)

Off by default (makemore does not clip). It runs between a step's hooks and its update, so the
hooks see the gradients of the backward pass and the optimizer the clipped ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

CLIP_EPS = 1e-6  # torch's: keeps the factor finite at a zero norm, and just below max_norm / total


def global_norm(grads: dict[str, Tensor]) -> Tensor:
    """The 2-norm of all the gradients as one vector, (): the norm of the per-parameter norms."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))


def clip_grad_norm(grads: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], Tensor]:
    """(the gradients scaled to a global norm of at most max_norm, the norm before clipping).

    Fresh tensors (the gradient policy): the dict given is left as it was. As torch, the factor
    min(1, max_norm / (total + 1e-6)) is applied to every gradient, also when it is 1.
    """
    total = global_norm(grads)  # ()
    factor = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)  # ()
    return {name: g * factor for name, g in grads.items()}, total
