"""Containers: a residual branch sums the gradients of the tensor it uses twice, against autograd."""

from __future__ import annotations

import torch

from backprop_ninja.nn import Linear, Residual, Sequential, Tanh


def test_a_residual_branch_backward_matches_autograd():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    block = Residual(Sequential([Linear(W, b, names=("W", "b")), Tanh()]))
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    dout = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # non-uniform: ones would hide a bug
    out = block.forward(x)
    dx = block.backward(dout)

    leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
    ref = leaves[0] + torch.tanh(leaves[0] @ leaves[1] + leaves[2])
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, leaves[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.grads["W"], leaves[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.grads["b"], leaves[2].grad, rtol=1e-12, atol=1e-12)
    # without the identity path's share the gradient would be the branch's alone: a test that can fail
    assert not torch.allclose(dx, leaves[0].grad - dout)
