"""One hand-written backward to check, and its two oracles: autograd and float64 central differences.

Shared by the op tests of the sequence models (test_sequence_ops.py) and of the transformer
(test_transformer_ops.py); each file judges the results by its own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from backprop_ninja.checking.finite_differences import central_differences
from backprop_ninja.checking.verdict import FD_EPS


class Case(NamedTuple):
    """One backward to check: its gradients and everything both oracles need to recompute them."""

    names: list[str]  # of the inputs, for the failure message
    mine: list[Tensor]  # the hand-written gradients, in the forward's input order
    forward: Callable[..., Tensor]  # the op's own forward, for finite differences
    reference: Callable[..., Tensor]  # the same maths in torch's own functions, for autograd
    dout: Tensor  # the upstream gradient
    inputs: list[Tensor]


def autograd_grads(case: Case, reference: Callable[..., Tensor] | None = None) -> list[Tensor]:
    """Autograd's gradients of (reference(*inputs) * dout).sum() with respect to each input."""
    leaves = [x.detach().clone().requires_grad_(True) for x in case.inputs]
    ((reference or case.reference)(*leaves) * case.dout).sum().backward()
    return [leaf.grad for leaf in leaves]


def finite_difference_grads(case: Case) -> list[Tensor]:
    """Central differences of (forward(*inputs) * dout).sum(), every entry of every input."""

    def grad_of(which: int) -> Tensor:
        def loss_of(x: Tensor) -> Tensor:
            inputs = case.inputs[:which] + [x] + case.inputs[which + 1:]
            return (case.forward(*inputs) * case.dout).sum()

        return central_differences(loss_of, case.inputs[which], eps=FD_EPS)

    return [grad_of(which) for which in range(len(case.inputs))]
