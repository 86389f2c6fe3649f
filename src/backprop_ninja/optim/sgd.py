"""Plain SGD, the lectures' `p.data += -lr * p.grad`, with optional decoupled weight decay."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Optimizer(Protocol):
    name: str

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float) -> None:
        """Update every parameter in place from its gradient."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """The optimizer's state as named tensors (empty for a stateless one)."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class SGD:
    """p -= lr * grad for every parameter; with weight_decay w, first p *= 1 - lr * w (decoupled)."""

    name = "sgd"

    def __init__(self, params: dict[str, Tensor], weight_decay: float = 0.0) -> None:
        self.names = list(params)
        self.weight_decay = weight_decay

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float) -> None:
        for name, p in params.items():
            if self.weight_decay:
                p.mul_(1 - lr * self.weight_decay)
            p.add_(grads[name], alpha=-lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"SGD keeps no state, got {', '.join(sorted(state))}")
