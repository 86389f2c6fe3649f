"""--device: where a run's tensors live."""

from __future__ import annotations

import torch

from backprop_ninja.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'cpu', or 'cuda' when asked for and available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu or cuda")
    return device
