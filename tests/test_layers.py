"""The layer classes: BatchNorm1d's statistics and modes, FlattenConsecutive's shapes, and
Sequential's backward (reverse order, fresh gradients, the recorded gradient of every layer output)
against autograd and float64 finite differences on a small wavenet-shaped stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Layer, Linear, Sequential, Tanh

B, T, E, H, V = 5, 4, 7, 9, 11
DOUBLE = torch.float64

# float64 against autograd, the same formulas up to summation order: rounding noise 1e-16..1e-14.
AUTOGRAD_RTOL = 1e-10
AUTOGRAD_ATOL = 1e-12
# torch.autograd.gradcheck's float64 defaults; correct gradients land at 1e-9..1e-11.
FD_EPS = 1e-6
FD_ATOL = 1e-5
FD_RTOL = 1e-3


def rand(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=DOUBLE)


def small_wavenet(g: torch.Generator) -> Sequential:
    """Two levels of pairs over T=4 positions: 3-D Linear/BatchNorm/Tanh, then 2-D, then logits."""
    return Sequential([
        Embedding(rand(V, E, g=g), name="C"),
        FlattenConsecutive(2),  # (B, 2, 2E)
        Linear(rand(2 * E, H, g=g) / 4, None, names=("W1", "b1")),
        BatchNorm1d(rand(H, g=g) * 0.1 + 1, rand(H, g=g) * 0.1, ("g1", "beta1"), ("m1", "v1")),
        Tanh(),
        FlattenConsecutive(2),  # (B, 2H)
        Linear(rand(2 * H, H, g=g) / 4, rand(H, g=g), names=("W2", "b2")),
        BatchNorm1d(rand(H, g=g) * 0.1 + 1, rand(H, g=g) * 0.1, ("g2", "beta2"), ("m2", "v2")),
        Tanh(),
        Linear(rand(H, V, g=g) / 3, rand(V, g=g), names=("W3", "b3")),
    ])  # fmt: skip


def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B,), generator=g)


def hand_written(net: Sequential, X: Tensor, Y: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
    douts: list[Tensor] = []
    _, cache = ops.cross_entropy_forward(net.forward(X), Y)
    net.backward(ops.cross_entropy_backward(cache), douts=douts)
    return dict(net.grads), douts


# ---------------------------------------------------------------------------------------------
# Sequential


def test_sequential_backward_matches_autograd_for_every_parameter_and_layer_output():
    g = torch.Generator().manual_seed(0)
    net, (X, Y) = small_wavenet(g), batch(g)
    grads, douts = hand_written(net, X, Y)

    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in net.params.items()}
    outs: list[Tensor] = []
    with net.substituted(leaves):
        logits = net.forward(X, outs=outs)
        for out in outs:
            out.retain_grad()
        F.cross_entropy(logits, Y).backward()

    assert len(douts) == len(outs) == len(net.layers)
    for dout, out in zip(douts, outs):
        assert dout.shape == out.shape
        torch.testing.assert_close(dout, out.grad, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    assert grads.keys() == net.params.keys()
    for name, leaf in leaves.items():
        torch.testing.assert_close(grads[name], leaf.grad, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


def test_sequential_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    net, (X, Y) = small_wavenet(g), batch(g)
    grads, _ = hand_written(net, X, Y)
    for name, p in net.params.items():
        flat = p.view(-1)
        numerical = torch.empty_like(flat)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + FD_EPS
            plus = F.cross_entropy(net.forward(X), Y).item()
            flat[i] = original - FD_EPS
            minus = F.cross_entropy(net.forward(X), Y).item()
            flat[i] = original
            numerical[i] = (plus - minus) / (2 * FD_EPS)
        torch.testing.assert_close(grads[name], numerical.view_as(p), rtol=FD_RTOL, atol=FD_ATOL, msg=name)


def test_sequential_backward_runs_the_layers_in_reverse():
    calls: list[str] = []

    class Spy(Layer):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: Tensor) -> Tensor:
            calls.append(f"forward {self.name}")
            return x

        def backward(self, dout: Tensor) -> Tensor:
            calls.append(f"backward {self.name}")
            return dout

    net = Sequential([Spy("a"), Spy("b"), Spy("c")])
    net.backward(net.forward(torch.zeros(1)))
    assert calls == ["forward a", "forward b", "forward c", "backward c", "backward b", "backward a"]


def test_gradients_are_returned_fresh_not_accumulated():
    g = torch.Generator().manual_seed(2)
    net, (X, Y) = small_wavenet(g), batch(g)
    first, _ = hand_written(net, X, Y)
    first = {k: v.clone() for k, v in first.items()}
    second, _ = hand_written(net, X, Y)  # no zero_grad in between
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_sequential_rejects_two_layers_with_the_same_parameter_name():
    w = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="same parameter name"):
        Sequential([Linear(w, None, names=("W", "b")), Linear(w, None, names=("W", "b"))])


def test_substituted_restores_parameters_and_buffers():
    g = torch.Generator().manual_seed(3)
    net, (X, _) = small_wavenet(g), batch(g)
    params = dict(net.params)
    buffers = {k: v.clone() for k, v in net.buffers.items()}
    with net.substituted({k: v * 2 for k, v in params.items()}):
        net.train(True).forward(X)  # training mode moves the running statistics
    assert all(net.params[k] is params[k] for k in params)
    assert all(net.layers[2].params[k] is params[k] for k in net.layers[2].params)
    assert all(torch.equal(net.buffers[k], buffers[k]) for k in buffers)


# ---------------------------------------------------------------------------------------------
# BatchNorm1d


def test_batchnorm_running_statistics_follow_the_lectures_momentum_update_for_3d_inputs():
    g = torch.Generator().manual_seed(4)
    momentum = 0.1
    bn = BatchNorm1d(torch.ones(H, dtype=DOUBLE), torch.zeros(H, dtype=DOUBLE), momentum=momentum)
    x1, x2 = rand(B, T, H, g=g) * 2 + 1, rand(B, T, H, g=g) - 3
    bn.forward(x1)
    bn.forward(x2)
    assert bn.buffers["running_mean"].shape == bn.buffers["running_var"].shape == (H,)  # like gain
    mean, var = torch.zeros(H, dtype=DOUBLE), torch.ones(H, dtype=DOUBLE)
    for x in (x1, x2):  # the lecture: running = (1 - momentum) * running + momentum * batch stat
        mean = (1 - momentum) * mean + momentum * x.mean((0, 1))
        var = (1 - momentum) * var + momentum * x.var((0, 1))
    # the same update up to the last bit (computed as a fused lerp_): float64 rounding noise
    torch.testing.assert_close(bn.buffers["running_mean"], mean, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    torch.testing.assert_close(bn.buffers["running_var"], var, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


def test_batchnorm_eval_mode_uses_the_buffers_and_leaves_them_alone():
    g = torch.Generator().manual_seed(5)
    bn = BatchNorm1d(rand(1, H, g=g), rand(1, H, g=g))  # the lecture MLP's (1, H) gain
    bn.buffers["running_mean"].copy_(rand(1, H, g=g))
    bn.buffers["running_var"].copy_(rand(1, H, g=g).abs())
    before = {k: v.clone() for k, v in bn.buffers.items()}
    bn.training = False
    x = rand(B, H, g=g)
    out = bn.forward(x)
    expected = ops.batchnorm_inference(x, bn.params["gamma"], bn.params["beta"], before["running_mean"],
                                       before["running_var"])
    assert torch.equal(out, expected)
    assert all(torch.equal(bn.buffers[k], before[k]) for k in before)
    # one example at a time gives the same output: eval mode does not look at the batch
    assert torch.allclose(bn.forward(x[:1]), out[:1], rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


def test_calibrate_sets_the_exact_statistics_of_every_batchnorm():
    g = torch.Generator().manual_seed(6)
    net, (X, _) = small_wavenet(g), batch(g)
    net.calibrate(X)
    emb = net.layers[0].params["C"][X]  # (B, T, E)
    h1 = emb.reshape(B, T // 2, 2 * E) @ net.params["W1"]  # (B, 2, H) what BatchNorm 1 sees
    torch.testing.assert_close(net.buffers["m1"], h1.mean((0, 1)), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    torch.testing.assert_close(net.buffers["v1"], h1.var((0, 1)), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    # calibrated eval of the batch it was calibrated on is the training-mode forward pass
    train_out = net.train(True).forward(X)
    net.calibrate(X)
    torch.testing.assert_close(net.train(False).forward(X), train_out, rtol=1e-8, atol=1e-10)


def test_calibrate_on_counted_rows_equals_calibrate_on_the_rows_repeated():
    g = torch.Generator().manual_seed(7)
    net, (X, _) = small_wavenet(g), batch(g)  # 3-D BatchNorm, then 2-D
    counts = torch.tensor([1, 4, 2, 1, 3])  # (B,)
    net.calibrate(X.repeat_interleave(counts, dim=0))
    expected = {k: v.clone() for k, v in net.buffers.items()}
    net.calibrate(X, counts)
    for name, buf in expected.items():
        torch.testing.assert_close(net.buffers[name], buf, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------
# FlattenConsecutive


def test_flatten_consecutive_squeezes_only_when_one_group_is_left():
    x = torch.zeros(B, 8, E)
    assert FlattenConsecutive(2).forward(x).shape == (B, 4, 2 * E)
    assert FlattenConsecutive(8).forward(x).shape == (B, 8 * E)
    assert FlattenConsecutive(2).forward(torch.zeros(B, 2, E)).shape == (B, 2 * E)
