"""Every hand-written backward of `ops` against autograd and against float64 finite differences.

Each op is differentiated through a "fake loss" (out * dout).sum() with a random upstream dout, so
every entry of every gradient is tested, not only their sum. Shapes are small and odd
(B=5, T=6, E=7, H=9, V=11) so that a transposed or mis-broadcast gradient cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from backprop_ninja import ops

B, T, E, H, V = 5, 6, 7, 9, 11

# float64, same formula up to summation order: agreement to rounding noise, 1e-16..1e-14;
# a wrong backward is off by the size of the gradient itself (1e-2 and up).
AUTOGRAD_RTOL = 1e-10
AUTOGRAD_ATOL = 1e-12
# torch.autograd.gradcheck's defaults for float64 central differences with eps 1e-6: correct
# gradients land at 1e-9..1e-11 from the finite differences.
FD_EPS = 1e-6
FD_ATOL = 1e-5
FD_RTOL = 1e-3

# Hypothesis's shapes include batches of 2 and single features, where x - mean nearly cancels and
# 1/sqrt(var + eps) amplifies the rounding: looser than AUTOGRAD_*, still 1e6 below a wrong formula.
ANY_SHAPE_RTOL = 1e-8
ANY_SHAPE_ATOL = 1e-9

DOUBLE = torch.float64


def rand(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=DOUBLE)


def finite_differences(f: Callable[[], Tensor], x: Tensor, eps: float = FD_EPS) -> Tensor:
    """d f / d x by central differences; f() reads x, which is nudged in place and restored."""
    grad = torch.empty_like(x)
    flat, grad_flat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        original = flat[i].item()
        flat[i] = original + eps
        plus = f().item()
        flat[i] = original - eps
        minus = f().item()
        flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def autograd_grads(forward: Callable[..., Tensor], dout: Tensor, *inputs: Tensor) -> list[Tensor]:
    """Autograd's gradients of (forward(*inputs) * dout).sum() with respect to each input."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    (forward(*leaves) * dout).sum().backward()
    return [leaf.grad for leaf in leaves]


def assert_matches_autograd(mine: Tensor, reference: Tensor) -> None:
    torch.testing.assert_close(mine, reference, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


def assert_matches_finite_differences(
    mine: Tensor, forward: Callable[..., Tensor], dout: Tensor, inputs: list[Tensor], which: int
) -> None:
    x = inputs[which]
    numerical = finite_differences(lambda: (forward(*inputs) * dout).sum(), x)
    torch.testing.assert_close(mine, numerical, rtol=FD_RTOL, atol=FD_ATOL)


# ---------------------------------------------------------------------------------------------
# embedding


def test_embedding_backward_scatter_adds_repeated_rows():
    g = torch.Generator().manual_seed(0)
    table = rand(V, E, g=g)
    idx = torch.randint(0, 4, (B, T), generator=g)  # few distinct ids: many repeats
    out, cache = ops.embedding_forward(idx, table)
    dout = rand(*out.shape, g=g)
    dtable = ops.embedding_backward(dout, cache)

    (ref,) = autograd_grads(lambda C: C[idx], dout, table)
    assert_matches_autograd(dtable, ref)
    assert_matches_finite_differences(dtable, lambda C: C[idx], dout, [table], 0)
    assert (dtable[4:] == 0).all()  # rows never looked up get no gradient


# ---------------------------------------------------------------------------------------------
# flatten consecutive


@pytest.mark.parametrize("k, out_shape", [(2, (B, 3, 2 * E)), (3, (B, 2, 3 * E)), (T, (B, T * E))])
def test_flatten_consecutive_groups_positions_and_backward_undoes_it(k, out_shape):
    g = torch.Generator().manual_seed(1)
    x = rand(B, T, E, g=g)
    out, cache = ops.flatten_consecutive_forward(x, k)
    assert out.shape == out_shape  # squeezed to 2-D when one group is left
    # position j*k + i of group j lands at columns i*E..(i+1)*E: concatenation in order
    assert torch.equal(out.reshape(B, -1, k * E)[:, -1, :E], x[:, T - k])
    dout = rand(*out.shape, g=g)
    dx = ops.flatten_consecutive_backward(dout, cache)
    (ref,) = autograd_grads(lambda x: ops.flatten_consecutive_forward(x, k)[0], dout, x)
    assert torch.equal(dx, ref)  # a view moves numbers, it does not compute them: bit-exact


def test_flatten_consecutive_rejects_groups_that_do_not_divide_the_positions():
    with pytest.raises(ValueError, match="6 positions in groups of 4"):
        ops.flatten_consecutive_forward(torch.zeros(B, T, E), 4)


# ---------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("x_shape", [(B, E), (B, T, E)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_backward_matches_autograd_and_finite_differences(x_shape, bias):
    g = torch.Generator().manual_seed(2)
    x, w = rand(*x_shape, g=g), rand(E, H, g=g)
    b = rand(H, g=g) if bias else None
    out, cache = ops.linear_forward(x, w, b)
    dout = rand(*out.shape, g=g)
    dx, dw, db = ops.linear_backward(dout, cache)

    inputs = [x, w] + ([b] if bias else [])

    def forward(*args: Tensor) -> Tensor:
        return ops.linear_forward(*args)[0]

    mine = [dx, dw] + ([db] if bias else [])
    assert (db is None) == (not bias)
    for which, (grad, ref) in enumerate(zip(mine, autograd_grads(forward, dout, *inputs))):
        assert grad.shape == inputs[which].shape
        assert_matches_autograd(grad, ref)
        assert_matches_finite_differences(grad, forward, dout, inputs, which)


# ---------------------------------------------------------------------------------------------
# tanh


def test_tanh_backward_matches_autograd_and_finite_differences():
    g = torch.Generator().manual_seed(3)
    x = rand(B, T, H, g=g) * 2
    out, cache = ops.tanh_forward(x)
    dout = rand(*out.shape, g=g)
    dx = ops.tanh_backward(dout, cache)
    (ref,) = autograd_grads(torch.tanh, dout, x)
    assert_matches_autograd(dx, ref)
    assert_matches_finite_differences(dx, torch.tanh, dout, [x], 0)


def test_tanh_backward_is_bit_exact_with_autograd_in_float32():
    """1 - h**2 rounded once, as autograd's fused tanh backward rounds it (see one_minus_square)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn((64, 200), generator=g) * 2
    dout = torch.randn((64, 200), generator=g)
    out, cache = ops.tanh_forward(x)
    (ref,) = autograd_grads(torch.tanh, dout, x)
    assert torch.equal(ops.tanh_backward(dout, cache), ref)


# ---------------------------------------------------------------------------------------------
# batchnorm


def batchnorm_reference(x: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    """The lectures' BatchNorm written with torch ops only, for autograd."""
    dims = (0,) if x.ndim == 2 else (0, 1)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=True)
    return gain * (x - mean) / torch.sqrt(var + ops.BATCHNORM_EPS) + bias


@pytest.mark.parametrize(
    "x_shape, gain_shape",
    [((B, H), (H,)), ((B, H), (1, H)), ((B, T, H), (H,))],
    ids=["2d", "2d-lecture-gain", "3d"],
)
def test_batchnorm_backward_matches_autograd_and_finite_differences(x_shape, gain_shape):
    g = torch.Generator().manual_seed(5)
    x = rand(*x_shape, g=g) * 3 + 1
    gain, bias = rand(*gain_shape, g=g) * 0.1 + 1, rand(*gain_shape, g=g) * 0.1
    out, cache, _ = ops.batchnorm_forward(x, gain, bias)
    reference = batchnorm_reference(x, gain, bias)
    torch.testing.assert_close(out, reference, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    dout = rand(*out.shape, g=g)
    mine = ops.batchnorm_backward(dout, cache)

    def forward(*args: Tensor) -> Tensor:
        return ops.batchnorm_forward(*args)[0]

    inputs = [x, gain, bias]
    for which, (grad, ref) in enumerate(zip(mine, autograd_grads(batchnorm_reference, dout, *inputs))):
        assert grad.shape == inputs[which].shape
        assert_matches_autograd(grad, ref)
        assert_matches_finite_differences(grad, forward, dout, inputs, which)


def test_batchnorm_3d_statistics_pool_batch_and_positions():
    g = torch.Generator().manual_seed(6)
    x = rand(B, T, H, g=g)
    _, cache, stats = ops.batchnorm_forward(x, torch.ones(H, dtype=DOUBLE), torch.zeros(H, dtype=DOUBLE))
    assert cache.dims == (0, 1)
    assert stats.mean.shape == stats.var.shape == (1, 1, H)
    samples = x.reshape(B * T, H)  # every position of every example is one sample of each feature
    torch.testing.assert_close(stats.mean.reshape(H), samples.mean(0), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    torch.testing.assert_close(stats.var.reshape(H), samples.var(0), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


def test_batchnorm_rejects_inputs_that_are_not_2d_or_3d():
    with pytest.raises(ValueError, match=r"\(B, H\) or \(B, T, H\)"):
        ops.batchnorm_forward(torch.zeros(2, 3, 4, 5), torch.ones(5), torch.zeros(5))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(2, 6),
    positions=st.one_of(st.none(), st.integers(1, 4)),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_batchnorm_backward_matches_autograd_on_any_shape(batch, positions, width, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, width) if positions is None else (batch, positions, width)
    x = rand(*shape, g=g)
    gain, bias = rand(width, g=g), rand(width, g=g)
    out, cache, _ = ops.batchnorm_forward(x, gain, bias)
    dout = rand(*out.shape, g=g)
    references = autograd_grads(batchnorm_reference, dout, x, gain, bias)
    for grad, ref in zip(ops.batchnorm_backward(dout, cache), references):
        torch.testing.assert_close(grad, ref, rtol=ANY_SHAPE_RTOL, atol=ANY_SHAPE_ATOL)


# ---------------------------------------------------------------------------------------------
# cross-entropy


def test_cross_entropy_backward_matches_autograd_and_finite_differences():
    g = torch.Generator().manual_seed(7)
    logits = rand(B, V, g=g) * 3
    targets = torch.randint(0, V, (B,), generator=g)
    loss, cache = ops.cross_entropy_forward(logits, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-15)
    dlogits = ops.cross_entropy_backward(cache)

    def forward(z: Tensor) -> Tensor:
        return ops.cross_entropy_forward(z, targets)[0]

    one = torch.ones((), dtype=DOUBLE)  # the loss is the end of the graph: dloss = 1
    (ref,) = autograd_grads(forward, one, logits)
    assert_matches_autograd(dlogits, ref)
    assert_matches_finite_differences(dlogits, forward, one, [logits], 0)
    torch.testing.assert_close(dlogits.sum(1), torch.zeros(B, dtype=DOUBLE), rtol=0, atol=1e-15)


def test_cross_entropy_backward_is_stable_for_huge_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0]])
    _, cache = ops.cross_entropy_forward(logits, torch.tensor([1]))
    dlogits = ops.cross_entropy_backward(cache)
    assert torch.isfinite(dlogits).all()
    torch.testing.assert_close(dlogits, torch.tensor([[1.0, -1.0, 0.0]]))
