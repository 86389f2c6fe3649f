"""The transformer's C kernels (ops/native_transformer.py, ops/transformer_kernels.c) against the readable ops.

Each kernel's float32 result is judged by the package's one verdict against the readable op
(ops.linear, ops.layernorm, ops.gelu, ops.attention) computed in float64 on the same numbers
(judge_float64_truth: the truth rounded to float32, within float32's rounding bound of the scale),
on odd shapes: T = 1, head size 1, widths that leave every vector loop a remainder, shapes past
the attention's 16 x 16 tiles (its other code), inputs x100. The tests must be able to fail: a
result off by 1e-3 of its scale in one entry is called wrong, and so is a kernel given a wrong
constant (GELU's 0.044715, LayerNorm's eps, the attention's 1/sqrt(hs)). Where the kernels do not
apply (float64, strided tensors, autograd, no library) the torch forms run, bit for bit.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.checking.verdict import gradient_scale, judge, judge_float64_truth, scale_floor
from backprop_ninja.models import build_model
from backprop_ninja.models.transformer import TransformerConfig
from backprop_ninja.ops import dropout, fused_transformer, native_transformer
from backprop_ninja.ops.native_transformer import HeadsCache

needs_kernels = pytest.mark.skipif(not native_transformer.native_available(), reason="the C kernels are not built")
pytestmark = needs_kernels

F32, F64 = torch.float32, torch.float64
LARGE = 100.0  # inputs x100: scores of thousands, a saturated softmax and GELU


def rand(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=F32)


def wrong_verdicts(mine: list[Tensor], truths: list[Tensor]) -> list[str]:
    """The reason for each result the verdict calls wrong against its float64 truth, as "name: reason"
    (empty when every one is right). The scale: each truth's largest entry, never below SCALE_FLOOR
    of the largest of the check."""
    floor = scale_floor(truths)
    wrong = []
    for i, (m, truth) in enumerate(zip(mine, truths)):
        verdict = judge_float64_truth(m, truth, F32, gradient_scale(truth, floor))
        if not verdict.right:
            wrong.append(f"result {i}: {verdict.reason}")
    return wrong


def assert_right(mine: list[Tensor], truths: list[Tensor]) -> None:
    wrong = wrong_verdicts(mine, truths)
    assert not wrong, "; ".join(wrong)
    # ... and the same check can fail: one entry off by 1e-3 of its scale is wrong
    for i, (m, truth) in enumerate(zip(mine, truths)):
        slipped = m.clone()
        slipped.view(-1)[m.numel() // 2] += 1e-3 * gradient_scale(truth, scale_floor(truths))
        assert wrong_verdicts(mine[:i] + [slipped] + mine[i + 1:], truths), f"result {i}: a slip passed"


# ---------------------------------------------------------------------------------------------
# Linear: the products of the transformer's Linears (one torch thread, as conftest sets)


def linear_results(x: Tensor, w: Tensor, b: Tensor | None, dout: Tensor):
    out, cache = native_transformer.linear_forward(x, w, b)
    return [out, *(grad for grad in native_transformer.linear_backward(dout, cache) if grad is not None)]


def linear_truths(x: Tensor, w: Tensor, b: Tensor | None, dout: Tensor):
    out, cache = ops.linear_forward(x.double(), w.double(), b.double() if b is not None else None)
    return [out, *(grad for grad in ops.linear_backward(dout.double(), cache) if grad is not None)]


# x's shape and fan-out: makemore's four Linears and its head at a packed batch's rows, a 3-D input,
# widths that leave every block of columns a remainder, one entry, and more rows than a pass of dw's sum
LINEAR_SHAPES = {"qkv": ((228, 64), 192), "att proj": ((228, 64), 64), "fc": ((228, 64), 256),
                 "mlp proj": ((228, 256), 64), "head": ((228, 64), 27), "3-D": ((3, 5, 33), 17),
                 "one": ((1, 1), 1), "rows past KC": ((300, 8), 40)}


def linear_inputs(shape, scale: float, bias: bool = True, seed: int = 5):
    (*rows, F), H = shape
    g = torch.Generator().manual_seed(seed)
    x, w = rand(*rows, F, g=g) * scale, rand(F, H, g=g) / math.sqrt(F)
    return x, w, rand(H, g=g) if bias else None, rand(*rows, H, g=g)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_kernels_are_the_readable_op(shape, scale, bias):
    inputs = linear_inputs(LINEAR_SHAPES[shape], scale, bias)
    mine = linear_results(*inputs)
    assert len(mine) == (4 if bias else 3)
    assert_right(mine, linear_truths(*inputs))


def test_a_linear_kernel_that_drops_the_bias_or_reads_w_untransposed_is_wrong():
    x, w, b, dout = linear_inputs(((9, 12), 12), 1.0)
    lib = native_transformer.load_library()
    out, dx, dw, db = (torch.empty_like(t) for t in (dout, x, w, b))
    lib.linear_forward(9, 12, 12, x.data_ptr(), w.data_ptr(), None, out.data_ptr())  # the bias left out
    truth_out, truth_dx, truth_dw, truth_db = linear_truths(x, w, b, dout)
    assert wrong_verdicts([out], [truth_out]) and not wrong_verdicts([out + b], [truth_out])
    wT = w.T.contiguous()  # a square w read as its transpose: dx = dout @ w
    assert lib.linear_backward(9, 12, 12, dout.data_ptr(), x.data_ptr(), wT.data_ptr(), dx.data_ptr(),
                               dw.data_ptr(), db.data_ptr()) == 0
    assert wrong_verdicts([dx], [truth_dx]) and not wrong_verdicts([dw, db], [truth_dw, truth_db])


def test_on_more_threads_the_linears_run_torchs_products(monkeypatch):
    """torch's BLAS splits a product between threads; the C code is single-threaded."""
    from backprop_ninja.threads import torch_threads

    calls = []
    for name in ("linear_forward", "linear_backward"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, op=op, name=name: calls.append(name) or op(*args))
    x, w, b, dout = linear_inputs(LINEAR_SHAPES["qkv"], 1.0)
    native_transformer.linear_backward(dout, native_transformer.linear_forward(x, w, b)[1])
    assert calls == []  # on one thread, the C products
    with torch_threads(2):
        native_transformer.linear_backward(dout, native_transformer.linear_forward(x, w, b)[1])
    assert calls == ["linear_forward", "linear_backward"]


# ---------------------------------------------------------------------------------------------
# LayerNorm


def layernorm_results(x: Tensor, weight: Tensor, bias: Tensor, dout: Tensor, eps: float = ops.LAYERNORM_EPS):
    out, cache = native_transformer.layernorm_forward(x, weight, bias, eps)
    return [out, cache.xhat, cache.rstd, *native_transformer.layernorm_backward(dout, cache)]


def layernorm_truths(x: Tensor, weight: Tensor, bias: Tensor, dout: Tensor):
    out, cache = ops.layernorm_forward(x.double(), weight.double(), bias.double())
    return [out, cache.xhat, cache.rstd, *ops.layernorm_backward(dout.double(), cache)]


LAYERNORM_SHAPES = {"B,T,E": (3, 5, 6), "E=64": (2, 16, 64), "E=67": (4, 3, 67), "E=8": (5, 8), "E=1": (3, 4, 1),
                    "one row": (1, 1, 13), "2d": (7, 5)}


def layernorm_inputs(shape, scale: float, seed: int = 10):
    g = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (rand(*shape, g=g) + 0.5) * scale  # an offset: the mean's term is not ~0
    weight, bias = 1 + 0.5 * rand(width, g=g), rand(width, g=g)
    return x, weight, bias, rand(*shape, g=g)


@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", LAYERNORM_SHAPES)
def test_layernorm_kernels_are_the_readable_op(shape, scale):
    inputs = layernorm_inputs(LAYERNORM_SHAPES[shape], scale)
    mine, truths = layernorm_results(*inputs), layernorm_truths(*inputs)
    if shape == "E=1":  # x - mean is exactly 0: out = bias, dx and dweight exactly 0, as the op's
        assert torch.equal(mine[3], torch.zeros_like(mine[3])) and torch.equal(mine[4], torch.zeros_like(mine[4]))
    assert_right(mine, truths)


def test_layernorm_with_another_eps_is_wrong():
    inputs = layernorm_inputs((3, 5, 6), 1.0)
    x = inputs[0] * 0.05  # var ~ 2.5e-3: eps 1e-3 instead of 1e-5 moves rstd by ~20%
    inputs = (x, *inputs[1:])
    assert not wrong_verdicts(layernorm_results(*inputs), layernorm_truths(*inputs))
    assert wrong_verdicts(layernorm_results(*inputs, eps=1e-3), layernorm_truths(*inputs))


# ---------------------------------------------------------------------------------------------
# GELU


GELU_SHAPES = {"B,T,4E": (3, 5, 24), "MLP": (2, 16, 256), "odd": (3, 7, 37), "one": (1,), "17": (17,)}


def gelu_inputs(shape, scale: float):
    g = torch.Generator().manual_seed(20)
    return rand(*shape, g=g) * 3 * scale, rand(*shape, g=g)  # both tails and the bend


def gelu_results(x: Tensor, dout: Tensor):
    out, cache = native_transformer.gelu_forward(x)
    return [out, cache.tanh_inner, native_transformer.gelu_backward(dout, cache)]


def gelu_truths(x: Tensor, dout: Tensor):
    out, cache = ops.gelu_forward(x.double())
    return [out, cache.tanh_inner, ops.gelu_backward(dout.double(), cache)]


@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", GELU_SHAPES)
def test_gelu_kernels_are_the_readable_op(shape, scale):
    x, dout = gelu_inputs(GELU_SHAPES[shape], scale)
    assert_right(gelu_results(x, dout), gelu_truths(x, dout))


def test_the_kernels_tanh_is_right_to_a_few_ulp_at_every_argument():
    """GELU's kernel with beta 1 and kappa 0 computes tanh(x) itself: within 3 units of the last place
    of the float64 tanh (torch's float32 tanh: 0.6), 2 relative (through expm1, not (e^2u - 1) / (e^2u + 1),
    which loses every digit as u -> 0), exactly +-1 from 10 on, NaN for NaN."""
    u = torch.cat([torch.logspace(-38, 1.5, 20000), torch.linspace(0, 12, 200001),
                   torch.tensor([1e6, 1e12])])  # x**3 stays finite, so kappa x**3 is 0
    u = torch.cat([u, -u])  # (440006,)
    lib = native_transformer.load_library()
    out, tanh_u = torch.empty_like(u), torch.empty_like(u)  # (440006,) each, alive over the call
    lib.gelu_forward(u.numel(), u.data_ptr(), 1.0, 0.0, out.data_ptr(), tanh_u.data_ptr())
    truth = torch.tanh(u.double())
    error = (tanh_u.double() - truth).abs()
    ulp = torch.finfo(F32).eps * 2.0 ** torch.floor(torch.log2(truth.abs().clamp_min(1e-37)))  # of each result
    assert (error / ulp).max() < 3 and (error / truth.abs().clamp_min(1e-300)).max() < 2 * torch.finfo(F32).eps
    assert (tanh_u[u.abs() >= 10].abs() == 1).all() and torch.equal(tanh_u.sign(), u.sign())
    nan, out = torch.tensor([math.nan]), torch.empty(1)
    lib.gelu_forward(1, nan.data_ptr(), 1.0, 0.0, out.data_ptr(), tanh_u.data_ptr())
    assert out.isnan().all() and tanh_u[0].isnan()


def test_gelu_with_another_kappa_is_wrong(monkeypatch):
    x, dout = gelu_inputs((3, 5, 24), 1.0)
    monkeypatch.setattr(native_transformer, "GELU_KAPPA", 0.045)
    assert wrong_verdicts(gelu_results(x, dout), gelu_truths(x, dout))


# ---------------------------------------------------------------------------------------------
# the attention's heads: qkv (B, T, 3E) -> y (B, T, E)


def heads_truths(qkv: Tensor, dy: Tensor, n_head: int):
    """The readable ops in float64: split_heads, causal_attention, merge_heads, and back."""
    q, k, v, split = ops.split_heads_forward(qkv.double(), n_head)
    y, cache = ops.causal_attention_forward(q, k, v)
    out, merge = ops.merge_heads_forward(y)
    dq, dk, dv = ops.causal_attention_backward(ops.merge_heads_backward(dy.double(), merge), cache)
    return [out, cache.att, ops.split_heads_backward(dq, dk, dv, split)]


def heads_results(qkv: Tensor, dy: Tensor, n_head: int, recompute: bool = False):
    y, cache = native_transformer.heads_forward(qkv, n_head, recompute)
    assert isinstance(cache, HeadsCache)  # the C path
    return [y, native_transformer.heads_weights(cache), native_transformer.heads_backward(dy, cache)]


# B, T, nh, hs: the 16 x 16 tiles (T <= 16, hs <= 16) and the other code (T or hs past 16)
HEADS_SHAPES = {"T=5,hs=3": (3, 5, 2, 3), "T=1": (2, 1, 2, 3), "hs=1": (3, 4, 3, 1), "one head": (2, 6, 1, 5),
                "makemore": (2, 16, 4, 16), "T=17": (2, 17, 2, 16), "hs=17": (2, 16, 1, 17), "T=33,hs=2": (1, 33, 3, 2)}


def heads_inputs(shape, scale: float, seed: int = 30):
    B, T, nh, hs = shape
    g = torch.Generator().manual_seed(seed)
    return rand(B, T, 3 * nh * hs, g=g) * scale, rand(B, T, nh * hs, g=g), nh


@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", HEADS_SHAPES)
def test_attention_kernels_are_the_readable_ops(shape, scale):
    qkv, dy, nh = heads_inputs(HEADS_SHAPES[shape], scale)
    mine = heads_results(qkv, dy, nh)
    assert_right(mine, heads_truths(qkv, dy, nh))
    T = qkv.shape[1]
    assert torch.equal(mine[1].masked_select(ops.causal_mask(T)), torch.zeros(mine[1].shape[0] * nh * T * (T - 1) // 2))
    if scale == LARGE:  # saturated: some query reads one key only
        assert ops.attention_entropy(mine[1]).min() < 0.05 or T == 1


@pytest.mark.parametrize("shape", ["T=5,hs=3", "makemore", "T=17"])
def test_recomputed_attention_weights_give_the_same_floats(shape):
    qkv, dy, nh = heads_inputs(HEADS_SHAPES[shape], 1.0)
    kept, rebuilt = heads_results(qkv, dy, nh), heads_results(qkv, dy, nh, recompute=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, rebuilt))


def packed_inputs(shape, lengths: list[int], seed: int = 31):
    """A (B, T, 3E) qkv and (B, T, E) dy with zeros past each sequence's length, and their packing."""
    from backprop_ninja.ops.packing import live_packing

    qkv, dy, nh = heads_inputs(shape, 1.0, seed)
    B, T = qkv.shape[:2]
    Y = torch.where(torch.arange(T) < torch.tensor(lengths)[:, None], 1, -1)  # (B, T) predictions: the lengths
    packing = live_packing(Y)
    T_live = packing.positions
    dead = torch.arange(T_live) >= torch.tensor(lengths)[:, None]  # (B, T')
    qkv, dy = qkv[:, :T_live].masked_fill(dead[..., None], 0.0), dy[:, :T_live].masked_fill(dead[..., None], 0.0)
    return qkv.contiguous(), dy.contiguous(), nh, packing


# B, T, nh, hs and each sequence's length: the tiles, a sequence of none, and the other code
PACKED = {"tiles": ((4, 9, 2, 8), [9, 3, 0, 5]), "one": ((1, 16, 4, 16), [7]),
          "T=20": ((3, 20, 2, 4), [20, 1, 13]), "hs=17": ((2, 6, 1, 17), [2, 6])}


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("case", PACKED)
def test_packed_heads_are_the_padded_batchs_on_its_live_rows(case, recompute):
    """The C code on the live rows (R, 3E) gives, bit for bit, what it gives on the (B, T', 3E) form
    with zeros at the dead positions, on those rows (a dead row is zeros in a tile either way); the
    kept weights are the live block's, zeros past each length; and the torch forms agree to rounding."""
    from backprop_ninja.ops.packing import pack_forward

    shape, lengths = PACKED[case]
    qkv, dy, nh, packing = packed_inputs(shape, lengths)
    rows, dy_rows = pack_forward(qkv, packing)[0], pack_forward(dy, packing)[0]  # (R, 3E), (R, E)
    y, cache = native_transformer.heads_forward(rows, nh, recompute, packing=packing)  # (R, E)
    assert isinstance(cache, HeadsCache) and y.shape == (rows.shape[0], qkv.shape[2] // 3)
    dqkv = native_transformer.heads_backward(dy_rows, cache)  # (R, 3E)
    padded_y, padded_att, padded_dqkv = heads_results(qkv, dy, nh, recompute)
    assert torch.equal(y, pack_forward(padded_y, packing)[0])
    assert torch.equal(dqkv, pack_forward(padded_dqkv, packing)[0])
    att = native_transformer.heads_weights(cache)  # (B, nh, T', T')
    live = torch.arange(packing.positions) < packing.lengths[:, None]  # (B, T')
    block = (live[:, None, :, None] & live[:, None, None, :]).expand_as(att)  # (B, nh, T', T')
    assert torch.equal(att[block], padded_att[block]) and not att[~block].any()
    torch_y, torch_cache = fused_transformer.fused_heads_forward(qkv, nh)
    torch.testing.assert_close(y, pack_forward(torch_y, packing)[0], rtol=1e-5, atol=1e-6)
    torch_dqkv = fused_transformer.fused_heads_backward(dy, torch_cache)
    torch.testing.assert_close(dqkv, pack_forward(torch_dqkv, packing)[0], rtol=1e-5, atol=1e-5)


def test_packed_heads_fall_back_to_the_torch_forms_on_the_padded_form():
    """float64 (the checks): the torch forms on the (B, T', 3E) form, their live rows given back."""
    from backprop_ninja.ops.packing import pack_forward

    qkv, dy, nh, packing = packed_inputs(*PACKED["tiles"])
    rows, dy_rows = pack_forward(qkv.double(), packing)[0], pack_forward(dy.double(), packing)[0]
    y, cache = native_transformer.heads_forward(rows, nh, packing=packing)
    assert isinstance(cache, native_transformer.UnpackedHeadsCache)
    dqkv = native_transformer.heads_backward(dy_rows, cache)
    truth_y, _, truth_dqkv = heads_truths(qkv, dy, nh)
    for mine, truth in ((y, truth_y), (dqkv, truth_dqkv)):
        verdict = judge(mine, pack_forward(truth, packing)[0])
        assert verdict.right, verdict.reason


def test_a_strided_gradient_of_packed_heads_runs_the_torch_backward():
    """The C forward's cache with a dy the C code does not take: the torch forms on the padded form."""
    from backprop_ninja.ops.packing import pack_forward

    qkv, dy, nh, packing = packed_inputs(*PACKED["tiles"])
    rows, dy_rows = pack_forward(qkv, packing)[0], pack_forward(dy, packing)[0]
    y, cache = native_transformer.heads_forward(rows, nh, packing=packing)
    assert isinstance(cache, HeadsCache)
    strided = dy_rows.T.contiguous().T  # the same values, not contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(native_transformer.heads_backward(strided, cache),
                               native_transformer.heads_backward(dy_rows, cache), rtol=1e-5, atol=1e-5)


def test_packed_heads_with_rows_of_another_count_run_the_torch_forms():
    """A packing whose rows are not qkv's: the C code is not handed it (it would read past qkv)."""
    from backprop_ninja.ops.packing import pack_forward

    qkv, dy, nh, packing = packed_inputs(*PACKED["tiles"])
    rows = pack_forward(qkv, packing)[0][:-1]  # one row short
    with pytest.raises(RuntimeError):  # the torch forms' own error: the rows do not fit the places
        native_transformer.heads_forward(rows, nh, packing=packing)


def test_one_position_attends_to_itself_exactly_and_no_position_reads_the_future():
    qkv, dy, nh = heads_inputs((2, 1, 2, 3), 1.0)
    y, att, _ = heads_results(qkv, dy, nh)
    assert torch.equal(y, qkv[:, :, 12:]) and torch.equal(att, torch.ones_like(att))  # y = v, att = 1
    qkv, dy, nh = heads_inputs((2, 7, 2, 3), 1.0)
    dy[:, 1:] = 0  # a gradient at the first position only: it read q, k, v of position 0 alone
    dqkv = heads_results(qkv, dy, nh)[2]
    assert torch.equal(dqkv[:, 1:], torch.zeros_like(dqkv[:, 1:]))
    assert torch.equal(dqkv[:, 0, 12:], dy[:, 0])  # dv = att^T dy with att = 1
    assert torch.equal(dqkv[:, 0, :12], torch.zeros(2, 12))  # one key: the softmax's gradient is 0


def test_attention_with_another_scale_or_a_wrong_backward_is_wrong(monkeypatch):
    qkv, dy, nh = heads_inputs((3, 5, 2, 3), 1.0)
    truths = heads_truths(qkv, dy, nh)
    right = native_transformer.heads_backward
    monkeypatch.setattr(native_transformer, "heads_backward",
                        lambda dy, cache: right(dy, cache._replace(scale=cache.scale * 1.01)))
    assert [reason[:8] for reason in wrong_verdicts(heads_results(qkv, dy, nh), truths)] == ["result 2"]
    monkeypatch.undo()
    monkeypatch.setattr(native_transformer, "attention_scale", lambda hs: 1.0 / hs)  # forward and backward
    assert len(wrong_verdicts(heads_results(qkv, dy, nh), truths)) == 3


# ---------------------------------------------------------------------------------------------
# the loss: sequence cross-entropy over the predicted positions, its dlogits written by the forward


def loss_inputs(shape, scale: float, ignored: float = 0.3, seed: int = 60):
    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    Y = torch.randint(0, V, (B, T), generator=g)
    Y[torch.rand(B, T, generator=g) < ignored] = -1
    Y.view(-1)[0] = 0  # at least one prediction
    return rand(B, T, V, g=g) * scale, Y


def loss_results(logits: Tensor, Y: Tensor):
    loss, cache = native_transformer.sequence_cross_entropy_forward(logits, Y)
    assert isinstance(cache, native_transformer.CrossEntropyGradient)  # the C path
    return [loss.reshape(1), native_transformer.sequence_cross_entropy_backward(cache)]


def loss_truths(logits: Tensor, Y: Tensor):
    loss, cache = ops.sequence_cross_entropy_forward(logits.double(), Y)
    return [loss.reshape(1), ops.sequence_cross_entropy_backward(cache)]


LOSS_SHAPES = {"makemore": (32, 16, 27), "B,T,V": (3, 4, 5), "V=2": (2, 3, 2), "one position": (1, 1, 27)}


@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
def test_loss_kernel_is_the_readable_op(shape, scale):
    logits, Y = loss_inputs(LOSS_SHAPES[shape], scale)
    mine = loss_results(logits, Y)
    assert_right(mine, loss_truths(logits, Y))
    assert torch.equal(mine[1][Y == -1], torch.zeros_like(mine[1][Y == -1]))  # in no term of the loss: 0


def test_one_class_is_a_certain_prediction():
    logits, Y = loss_inputs((2, 3, 1), 1.0)
    loss, dlogits = loss_results(logits, Y)
    assert torch.equal(loss, torch.zeros(1)) and torch.equal(dlogits, torch.zeros_like(dlogits))


def test_the_loss_kernel_refuses_what_the_op_refuses_with_its_words():
    logits, Y = loss_inputs((3, 4, 5), 1.0)
    for bad in (torch.full_like(Y, -1), Y.masked_fill(Y == 0, 5), Y.masked_fill(Y == 0, -2)):
        with pytest.raises(ValueError) as mine:
            native_transformer.sequence_cross_entropy_forward(logits, bad)
        with pytest.raises(ValueError) as theirs:
            ops.sequence_cross_entropy_forward(logits, bad)
        assert str(mine.value) == str(theirs.value)


def test_a_nan_logit_gives_a_nan_loss():
    logits, Y = loss_inputs((3, 4, 5), 1.0, ignored=0.0)
    for at in (0, 3):  # the row's first logit (the max's start) and another
        bad = logits.clone()
        bad[1, 2, at] = math.nan
        loss, cache = native_transformer.sequence_cross_entropy_forward(bad, Y)
        assert loss.isnan() and cache.dlogits[1, 2].isnan().all() and not cache.dlogits[0].isnan().any()


# ---------------------------------------------------------------------------------------------
# where the kernels apply, and where the torch forms run instead


def torch_forms(x: Tensor, qkv: Tensor, dy: Tensor, weight: Tensor, bias: Tensor) -> list[Tensor]:
    out, cache = fused_transformer.fused_layernorm_forward(x, weight, bias)
    g_out, g_cache = fused_transformer.fused_gelu_forward(x)
    h_out, h_cache = fused_transformer.fused_heads_forward(qkv, 2)
    l_out, l_cache = ops.linear_forward(x, torch.outer(weight, bias), bias)  # a (6, 6) w
    return [out, *ops.layernorm_backward(x, cache), g_out, fused_transformer.fused_gelu_backward(x, g_cache), h_out,
            fused_transformer.fused_heads_backward(dy, h_cache), l_out, *ops.linear_backward(x, l_cache)]


def native_forms(x: Tensor, qkv: Tensor, dy: Tensor, weight: Tensor, bias: Tensor) -> list[Tensor]:
    out, cache = native_transformer.layernorm_forward(x, weight, bias)
    g_out, g_cache = native_transformer.gelu_forward(x)
    h_out, h_cache = native_transformer.heads_forward(qkv, 2)
    l_out, l_cache = native_transformer.linear_forward(x, torch.outer(weight, bias), bias)
    return [out, *native_transformer.layernorm_backward(x, cache), g_out, native_transformer.gelu_backward(x, g_cache),
            h_out, native_transformer.heads_backward(dy, h_cache), l_out,
            *native_transformer.linear_backward(x, l_cache)]


def small_inputs(dtype=F32):
    g = torch.Generator().manual_seed(40)
    x, qkv, dy = rand(3, 5, 6, g=g), rand(3, 5, 18, g=g), rand(3, 5, 6, g=g)
    return [t.to(dtype) for t in (x, qkv, dy, 1 + rand(6, g=g), rand(6, g=g))]


# ---------------------------------------------------------------------------------------------
# dropout: the C kernel and the torch form draw the same counter-based masks


@needs_kernels
@pytest.mark.parametrize("shape", [(1,), (7,), (32, 16, 64), (3, 5, 67)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_c_dropout_draws_the_torch_forms_masks_bit_for_bit(shape, p):
    g = torch.Generator().manual_seed(41)
    for key in (0, 1, (1 << 64) - 1, dropout.dropout_key(7, 3)):
        x = rand(*shape, g=g)
        out, cache = native_transformer.dropout_forward(x, key, p)
        ref_out, ref_cache = dropout.dropout_forward(x, key, p)
        assert torch.equal(cache.mask, ref_cache.mask) and torch.equal(out, ref_out), key
        assert torch.equal(out, x * cache.mask)


def test_dropout_draws_splitmix64():
    """u_0.. are the top 24 bits of SplitMix64's outputs from state `key`: from 0, its published first four."""
    first_four = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert dropout.uniform_bits(0, 4).tolist() == [z >> 40 for z in first_four]
    assert dropout.mix64(1 * dropout.GAMMA) == first_four[0]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_a_share_1_minus_p_and_one_calls_mask_says_nothing_of_the_next(p):
    n = 1 << 20
    sigma = math.sqrt(p * (1 - p) / n)
    keys = [dropout.dropout_key(seed, call) for seed, call in ((7, 0), (7, 1), (8, 0))]
    keeps = [dropout.dropout_forward(torch.ones(n), key, p)[1].mask > 0 for key in keys]  # (n,) bool each
    for keep in keeps:
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    agree = p * p + (1 - p) ** 2  # two independent masks agree on this share of the entries
    for a, b in ((0, 1), (0, 2)):
        assert abs((keeps[a] == keeps[b]).float().mean().item() - agree) < 5 * math.sqrt(agree * (1 - agree) / n)


@pytest.mark.parametrize("case", ["float64", "strided", "no library"])
def test_elsewhere_the_torch_forms_run_bit_for_bit(case, monkeypatch):
    inputs = small_inputs(F64 if case == "float64" else F32)
    if case == "strided":  # the same values, not contiguous (the parameters stay as they are)
        inputs = [t.transpose(0, 1).contiguous().transpose(0, 1) if t.ndim == 3 else t for t in inputs]
        assert not any(t.is_contiguous() for t in inputs[:3])
    if case == "no library":
        monkeypatch.setattr(native_transformer, "load_library", lambda: None)
    mine, theirs = native_forms(*inputs), torch_forms(*inputs)
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs))
    if case != "no library":  # and the kernels do run on contiguous float32
        kernels = native_forms(*[t.to(F32).contiguous() for t in inputs])
        assert not all(torch.equal(m, t.to(F32)) for m, t in zip(kernels, theirs))


def test_autograd_records_the_torch_forms():
    """The reference passes (check --model, --verify-every) differentiate the forward with autograd."""
    x, qkv, _, weight, bias = small_inputs()
    leaves = [t.clone().requires_grad_(True) for t in (x, qkv, weight)]
    out = native_transformer.layernorm_forward(leaves[0], leaves[2], bias)[0]
    loss = (native_transformer.gelu_forward(out)[0] + native_transformer.heads_forward(leaves[1], 2)[0]).sum()
    loss.backward()
    assert all(leaf.grad is not None and bool(leaf.grad.abs().sum() > 0) for leaf in leaves)


def test_eval_mode_keeps_no_cache_and_computes_the_same_floats():
    x, qkv, _, weight, bias = small_inputs()
    nt = native_transformer
    for kept, bare in [(nt.layernorm_forward(x, weight, bias), nt.layernorm_forward(x, weight, bias, keep=False)),
                       (nt.gelu_forward(x), nt.gelu_forward(x, keep=False)),
                       (nt.heads_forward(qkv, 2), nt.heads_forward(qkv, 2, keep=False))]:
        assert bare[1] is None and torch.equal(kept[0], bare[0])


def test_the_kernels_are_deterministic_and_never_write_their_inputs():
    inputs = small_inputs()
    before = [t.clone() for t in inputs]
    first, second = native_forms(*inputs), native_forms(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


def test_a_nan_input_gives_nan_never_a_silent_number():
    x, qkv, dy, weight, bias = small_inputs()
    x[1, 2, 3] = qkv[1, 2, 0] = math.nan
    out, _ = native_transformer.layernorm_forward(x, weight, bias)
    assert out[1, 2].isnan().all() and not out[0].isnan().any()  # its row only
    out, _ = native_transformer.gelu_forward(x)
    assert out.isnan().sum() == 1 and out[1, 2, 3].isnan()
    y, _ = native_transformer.heads_forward(qkv, 2)  # q of position 2, head 0, in example 1
    assert y[1, 2, :3].isnan().all() and not y[0].isnan().any() and not y[1, :2].isnan().any()


def test_a_model_on_the_kernels_gets_the_torch_forms_gradients(monkeypatch):
    config = TransformerConfig("transformer", vocab_size=11, block_size=7, n_layer=2, n_head=2, n_embd=10)
    model = build_model(config, torch.Generator().manual_seed(50))
    g = torch.Generator().manual_seed(51)
    X, Y = torch.randint(0, 11, (6, 7), generator=g), torch.randint(0, 11, (6, 7), generator=g)
    loss, grads = model.loss_and_grads(X, Y)
    grads = dict(grads)
    assert all(isinstance(layer.cache, HeadsCache) for layer in model.net.leaves() if hasattr(layer, "n_head"))
    monkeypatch.setattr(native_transformer, "load_library", lambda: None)
    torch_loss, torch_grads = model.loss_and_grads(X, Y)
    floor = scale_floor(torch_grads.values())
    assert judge(loss.reshape(1), torch_loss.reshape(1)).right
    for name, grad in torch_grads.items():
        verdict = judge(grads[name], grad, gradient_scale(grad, floor))
        assert verdict.right, f"{name}: {verdict.reason}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this machine")
def test_cuda_tensors_take_the_torch_forms():
    inputs = [t.cuda() for t in small_inputs()]
    assert all(torch.equal(m, t) for m, t in zip(native_forms(*inputs), torch_forms(*inputs)))


# ---------------------------------------------------------------------------------------------
# memory safety


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the sanitized kernels")
def test_the_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """tests/c/sanitize_transformer_kernels.c: odd shapes, buffers of exactly the size each kernel may touch."""
    source = Path(__file__).parent / "c" / "sanitize_transformer_kernels.c"
    binary = tmp_path / "sanitize_transformer_kernels"
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wno-psabi", str(source), "-o", str(binary), "-lm"], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "sanitized: 25 shapes clean"
