"""The transformer's hand-written backwards (layernorm, gelu, attention) against two oracles, judged by the verdict.

Each op is differentiated through a "fake loss" (out * dout).sum() with a random, non-uniform upstream
dout, so every entry of every gradient is tested. The oracles: autograd on torch's own functions
(F.layer_norm, F.gelu(approximate='tanh'), F.softmax, makemore's masked-softmax attention lines and
F.scaled_dot_product_attention(is_causal=True)), and float64 central finite differences of the op's
own forward. Every comparison is decided by the package's one verdict (checking.verdict): judge()
against autograd, judge_float64_truth() against finite differences, with gradient_scale and
scale_floor for the scale, so no tolerance here is this file's own.

Shapes are small and odd (B=3, T=5, E=6 in 2 heads of 3), with the edges T = 1, T = 2, head size 1
and a single head; the x100 inputs give logits of hundreds, where exp overflows float32 unless the
row max is subtracted. The last tests break one term of each backward and show the verdict calls it
wrong against both oracles.

Bit-exact (asserted with torch.equal): split_heads and merge_heads against autograd (they only move
numbers), attention at T = 1 against autograd, and the recomputed attention's gradients against the
cached one's. To rounding only (measured on torch 2.13, float32 and float64): softmax, whose aten
kernels sum a row in another order (given the same att, the two backwards differ in the last bit on
rows of 5), so attention at T > 1 too; LayerNorm, whose aten kernels arrange the same derivative
differently; GELU, which aten computes in one fused vector kernel that rounds differently from
separate tensor ops even in the same order of operations.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja.checking.verdict import Judgement, gradient_scale, judge, judge_float64_truth, scale_floor
from backprop_ninja.ops import attention, gelu, layernorm
from backprop_ninja.ops.linear import LinearCache, linear_backward, linear_forward

sys.path.insert(0, str(Path(__file__).parent))

from op_cases import Case, autograd_grads, finite_difference_grads  # noqa: E402

B, T, E, NH = 3, 5, 6, 2  # hs = E / NH = 3
LARGE = 100.0  # inputs x100: logits of hundreds, past float32's exp overflow at 89

DOUBLE = torch.float64
ORACLES = ["autograd", "finite-differences"]
# At x100 a softmax saturates: most of its gradients are exp(-hundreds) small, below the noise floor of
# finite differences (about 1e-16 * |loss| / eps = 1e-10), which then judge noise. So softmax and
# attention at x100 are judged against autograd (in float64 here, in float32 further down); LayerNorm,
# blind to the scale of its input, against both.
SATURATING = [pytest.param(1.0, "autograd", id="x1-autograd"),
              pytest.param(1.0, "finite-differences", id="x1-finite-differences"),
              pytest.param(LARGE, "autograd", id="x100-autograd")]


def rand(*shape: int, g: torch.Generator, dtype: torch.dtype = DOUBLE) -> Tensor:
    return torch.randn(shape, generator=g, dtype=dtype)


def verdicts(mine: list[Tensor], references: list[Tensor], finite_differences: bool) -> list[Judgement]:
    """The verdict on each gradient, its scale never below SCALE_FLOOR of the check's largest gradient."""
    floor = scale_floor(references)
    if finite_differences:  # float64 differences: trusted to FD_TRUTH_RTOL of the scale
        return [judge_float64_truth(m, r, r.dtype, gradient_scale(r, floor), finite_differences=True)
                for m, r in zip(mine, references)]
    return [judge(m, r, gradient_scale(r, floor)) for m, r in zip(mine, references)]


def assert_gradients(case: Case, oracle: str, reference: Callable[..., Tensor] | None = None) -> None:
    fd = oracle == "finite-differences"
    references = finite_difference_grads(case) if fd else autograd_grads(case, reference)
    assert len(case.mine) == len(case.inputs)
    for name, mine, x in zip(case.names, case.mine, case.inputs):
        assert mine.shape == x.shape, f"d{name}: shape {tuple(mine.shape)}, its input's {tuple(x.shape)}"
    for name, verdict in zip(case.names, verdicts(case.mine, references, fd)):
        assert verdict.right, f"d{name} vs {oracle}: {verdict.reason}"


def assert_right(mine: Tensor, reference: Tensor, what: str, scale: float | None = None) -> None:
    verdict = judge(mine, reference, scale)
    assert verdict.right, f"{what}: {verdict.reason}"


def assert_bit_exact(mine: list[Tensor], references: list[Tensor], names: list[str]) -> None:
    for name, m, r in zip(names, mine, references):
        assert m.shape == r.shape and torch.equal(m, r), f"d{name} is not bit for bit autograd's"


# ---------------------------------------------------------------------------------------------
# LayerNorm


def torch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=layernorm.LAYERNORM_EPS)


def layernorm_case(shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0, dtype=DOUBLE) -> Case:
    width = shape[-1]
    x = (rand(*shape, g=g, dtype=dtype) + 0.5) * scale  # an offset: the mean's term is not ~0
    weight = 1 + 0.5 * rand(width, g=g, dtype=dtype)
    bias = rand(width, g=g, dtype=dtype)
    out, cache = layernorm.layernorm_forward(x, weight, bias)
    assert_right(out, torch_layer_norm(x, weight, bias), "LayerNorm's output vs F.layer_norm")
    dout = rand(*out.shape, g=g, dtype=dtype)
    mine = list(layernorm.layernorm_backward(dout, cache))
    return Case(["x", "weight", "bias"], mine, lambda *a: layernorm.layernorm_forward(*a)[0], torch_layer_norm,
                dout, [x, weight, bias])


LAYERNORM_SHAPES = {"B,T,E": (B, T, E), "T=1": (B, 1, E), "T=2": (B, 2, E), "2d": (7, 5)}


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["x1", "x100"])
@pytest.mark.parametrize("shape", LAYERNORM_SHAPES)
def test_layernorm_backward_matches_autograd_and_finite_differences(shape, scale, oracle):
    assert_gradients(layernorm_case(LAYERNORM_SHAPES[shape], torch.Generator().manual_seed(10), scale), oracle)


def test_layernorm_of_width_one_gives_x_exactly_zero_gradient():
    """E = 1: x - mean is exactly 0, so out = bias whatever x is, and dx is exactly 0, as finite
    differences find; so is dweight = sum(dout * xhat). Autograd's dx and dweight there are rounding
    noise, not 0 (dx up to 6e-5 in float32, 6e-14 in float64: aten's algebra does not cancel
    exactly), so against autograd only dbias is judged."""
    case = layernorm_case((B, T, 1), torch.Generator().manual_seed(12))
    dx, dweight, dbias = case.mine
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dweight, torch.zeros_like(dweight))
    assert_gradients(case, "finite-differences")
    assert_right(dbias, autograd_grads(case)[2], "dbias vs autograd")


def test_layernorm_normalises_with_the_biased_variance_and_its_eps():
    """Each row of xhat has mean 0 and (biased) variance var / (var + eps); eps is nn.LayerNorm's."""
    assert layernorm.LAYERNORM_EPS == torch.nn.LayerNorm(E).eps == 1e-5
    x = rand(B, T, E, g=torch.Generator().manual_seed(11))
    _, cache = layernorm.layernorm_forward(x, torch.ones(E, dtype=DOUBLE), torch.zeros(E, dtype=DOUBLE))
    var = x.var(-1, unbiased=False, keepdim=True)
    assert_right(cache.xhat.mean(-1), torch.zeros(B, T, dtype=DOUBLE), "mean of xhat", gradient_scale(cache.xhat))
    assert_right(cache.xhat.var(-1, unbiased=False, keepdim=True), var / (var + 1e-5), "variance of xhat")
    assert_right(cache.rstd, (var + 1e-5).rsqrt(), "rstd")


def test_layernorm_rejects_parameters_of_another_width():
    with pytest.raises(ValueError, match=r"takes \(6,\) weight and bias"):
        layernorm.layernorm_forward(torch.zeros(B, T, E), torch.ones(E + 1), torch.zeros(E))


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation


def torch_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def makemore_new_gelu(x: Tensor) -> Tensor:
    """makemore's NewGELU, as written there."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_case(g: torch.Generator, dtype=DOUBLE) -> Case:
    x = rand(B, T, 4 * E, g=g, dtype=dtype) * 3  # the MLP's hidden width; both tails and the bend
    out, cache = gelu.gelu_forward(x)
    assert_right(out, torch_gelu(x), "GELU's output vs F.gelu(approximate='tanh')")
    assert_right(out, makemore_new_gelu(x), "GELU's output vs makemore's NewGELU")
    dout = rand(*out.shape, g=g, dtype=dtype)
    return Case(["x"], [gelu.gelu_backward(dout, cache)], lambda x: gelu.gelu_forward(x)[0], torch_gelu, dout, [x])


@pytest.mark.parametrize("oracle", ORACLES)
def test_gelu_backward_matches_autograd_and_finite_differences(oracle):
    assert_gradients(gelu_case(torch.Generator().manual_seed(20)), oracle)


def test_gelu_in_float32_is_right_to_rounding():
    """aten computes F.gelu in one fused vector kernel: float32 agrees to the verdict's rounding, not
    bit for bit (some entries differ in the last place), so bit-exactness is not claimed."""
    case = gelu_case(torch.Generator().manual_seed(21), dtype=torch.float32)
    assert_gradients(case, "autograd")
    assert_gradients(case, "autograd", reference=makemore_new_gelu)


# ---------------------------------------------------------------------------------------------
# softmax over the last dim


def softmax_case(shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0, dtype=DOUBLE) -> Case:
    x = rand(*shape, g=g, dtype=dtype) * scale
    out, cache = attention.softmax_forward(x)
    assert_right(out, F.softmax(x, dim=-1), "softmax vs F.softmax")
    dout = rand(*out.shape, g=g, dtype=dtype)
    return Case(["x"], [attention.softmax_backward(dout, cache)], lambda x: attention.softmax_forward(x)[0],
                lambda x: F.softmax(x, dim=-1), dout, [x])


SOFTMAX_SHAPES = {"B,nh,T,T": (B, NH, T, T), "T=1": (B, NH, 1, 1), "T=2": (B, NH, 2, 2), "2d": (4, 7)}


@pytest.mark.parametrize("scale, oracle", SATURATING)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax_backward_matches_autograd_and_finite_differences(shape, scale, oracle):
    assert_gradients(softmax_case(SOFTMAX_SHAPES[shape], torch.Generator().manual_seed(30), scale), oracle)


def test_softmax_gives_masked_logits_exactly_zero():
    x = torch.tensor([[0.0, float("-inf"), 2.0], [float("-inf"), float("-inf"), 5.0]])
    out, cache = attention.softmax_forward(x)
    assert out[0, 1] == 0 and torch.equal(out[1], torch.tensor([0.0, 0.0, 1.0]))
    dx = attention.softmax_backward(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), cache)
    assert torch.isfinite(dx).all() and dx[0, 1] == 0 and (dx[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# causal attention


def makemore_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """makemore's lines, on q, k, v (B, nh, T, hs)."""
    T = q.shape[-2]
    bias = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(bias[:, :, :T, :T] == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention_case(positions: int, n_head: int, head_size: int, g: torch.Generator, scale: float = 1.0,
                   recompute: bool = False, dtype=DOUBLE) -> Case:
    q, k, v = (rand(B, n_head, positions, head_size, g=g, dtype=dtype) for _ in range(3))
    q = q * scale  # x100: scores of hundreds
    y, cache = attention.causal_attention_forward(q, k, v, recompute=recompute)
    assert (cache.att is None) == recompute
    assert_right(y, makemore_attention(q, k, v), "attention vs makemore's lines")
    assert_right(y, sdpa_attention(q, k, v), "attention vs F.scaled_dot_product_attention")
    dy = rand(*y.shape, g=g, dtype=dtype)
    mine = list(attention.causal_attention_backward(dy, cache))
    return Case(["q", "k", "v"], mine, lambda *a: attention.causal_attention_forward(*a)[0], makemore_attention,
                dy, [q, k, v])


# (T, nh, hs): odd, the sequence edges, head size 1, one head as wide as E
ATTENTION_SHAPES = {"T=5,nh=2,hs=3": (T, NH, 3), "T=1": (1, NH, 3), "T=2": (2, NH, 3), "hs=1": (T, 3, 1),
                    "one-head": (T, 1, E)}


@pytest.mark.parametrize("scale, oracle", SATURATING)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_causal_attention_backward_matches_autograd_and_finite_differences(shape, scale, oracle):
    case = attention_case(*ATTENTION_SHAPES[shape], torch.Generator().manual_seed(40), scale)
    assert_gradients(case, oracle)


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_causal_attention_backward_matches_scaled_dot_product_attention(shape):
    case = attention_case(*ATTENTION_SHAPES[shape], torch.Generator().manual_seed(41))
    assert_gradients(case, "autograd", reference=sdpa_attention)


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_recomputing_att_in_the_backward_gives_the_same_gradients_bit_for_bit(shape, dtype):
    """The same code on the same q, k rebuilds the same att: the gradients are equal, not only close."""
    cached = attention_case(*ATTENTION_SHAPES[shape], torch.Generator().manual_seed(42), dtype=dtype)
    recomputed = attention_case(*ATTENTION_SHAPES[shape], torch.Generator().manual_seed(42), recompute=True,
                                dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(cached.inputs, recomputed.inputs))
    assert_bit_exact(recomputed.mine, cached.mine, recomputed.names)


def test_attention_of_one_position_is_v_bit_exact_with_autograd():
    """T = 1: att = [[1]], so y = v, dv = dy, and q, k get exactly 0 (softmax of one logit is constant)."""
    case = attention_case(1, NH, 3, torch.Generator().manual_seed(43), dtype=torch.float32)
    q, k, v = case.inputs
    assert torch.equal(attention.causal_attention_forward(q, k, v)[0], v)
    dq, dk, dv = case.mine
    assert torch.equal(dv, case.dout) and (dq == 0).all() and (dk == 0).all()
    assert_bit_exact(case.mine, autograd_grads(case), case.names)


def test_masked_scores_get_exactly_zero_gradient_and_no_position_reads_the_future():
    g = torch.Generator().manual_seed(44)
    q, k, v = (rand(B, NH, T, 3, g=g) for _ in range(3))
    att = attention.attention_weights(q, k)
    future = attention.causal_mask(T)
    assert (att[..., future] == 0).all() and (att[..., ~future] > 0).all()
    assert_right(att.sum(-1), torch.ones(B, NH, T, dtype=DOUBLE), "rows of att")
    # the softmax backward of a masked score is att * (...) = 0 exactly (some -0: the backward's fill
    # makes them +0), whatever datt is there; row 0 has one key, whose softmax is constant: 0 too
    dscores = attention.softmax_backward(rand(B, NH, T, T, g=g), attention.SoftmaxCache(att))
    read = ~future
    read[0] = False
    assert (dscores[..., future] == 0).all() and (dscores[..., 0, :] == 0).all() and (dscores[..., read] != 0).all()
    # a change to v at the last position moves no output before it
    v_later = v.clone()
    v_later[:, :, -1] += 1.0
    y, _ = attention.causal_attention_forward(q, k, v)
    y_later, _ = attention.causal_attention_forward(q, k, v_later)
    assert torch.equal(y[:, :, :-1], y_later[:, :, :-1]) and not torch.equal(y[:, :, -1], y_later[:, :, -1])


def test_large_logits_in_float32_give_finite_right_gradients():
    """x100 in float32, where exp(logit) overflows without the row max: finite, and right under the verdict."""
    softmax = softmax_case((B, NH, T, T), torch.Generator().manual_seed(45), LARGE, torch.float32)
    assert softmax.inputs[0].max() > 89  # exp overflows float32 from 89
    attn = attention_case(T, NH, 3, torch.Generator().manual_seed(46), LARGE, dtype=torch.float32)
    q, k, _ = attn.inputs
    assert ((q @ k.transpose(-2, -1)) / math.sqrt(3)).max() > 89  # the scores
    ln = layernorm_case((B, T, E), torch.Generator().manual_seed(47), LARGE, torch.float32)
    assert ln.inputs[0].abs().max() > 89
    for case in (softmax, attn, ln):
        assert all(torch.isfinite(d).all() for d in case.mine)
        assert_gradients(case, "autograd")


def test_attention_entropy_is_log_of_the_past_when_uniform_and_zero_when_one_hot():
    zeros = torch.zeros(B, NH, T, 1, dtype=DOUBLE)  # q = k = 0: every score equal, att uniform over the past
    uniform = attention.attention_weights(zeros, zeros)
    expected = torch.log(torch.arange(1, T + 1, dtype=DOUBLE)).mean()  # row t: log(t + 1)
    entropy = attention.attention_entropy(uniform)
    assert entropy.shape == (NH,)
    assert_right(entropy, expected.expand(NH), "entropy of uniform heads")
    one_hot = torch.eye(T, dtype=DOUBLE).expand(B, NH, T, T)  # each position reads only itself
    assert torch.equal(attention.attention_entropy(one_hot), torch.zeros(NH, dtype=DOUBLE))


# ---------------------------------------------------------------------------------------------
# split and merge heads


def makemore_split(qkv: Tensor, n_head: int) -> Tensor:
    """makemore's split of c_attn's output, stacked (3, B, nh, T, hs) for one fake loss."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)
    return torch.stack([t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v)])


def split_heads_case(positions: int, width: int, n_head: int, g: torch.Generator, dtype=DOUBLE) -> Case:
    qkv = rand(B, positions, 3 * width, g=g, dtype=dtype)
    q, k, v, cache = attention.split_heads_forward(qkv, n_head)
    assert q.shape == (B, n_head, positions, width // n_head)
    assert torch.equal(torch.stack([q, k, v]), makemore_split(qkv, n_head))
    dout = rand(3, *q.shape, g=g, dtype=dtype)
    dqkv = attention.split_heads_backward(dout[0], dout[1], dout[2], cache)
    return Case(["qkv"], [dqkv], lambda x: torch.stack(attention.split_heads_forward(x, n_head)[:3]),
                lambda x: makemore_split(x, n_head), dout, [qkv])


def makemore_merge(y: Tensor) -> Tensor:
    B, _, T, _ = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, -1)


def merge_heads_case(positions: int, n_head: int, head_size: int, g: torch.Generator, dtype=DOUBLE) -> Case:
    y = rand(B, n_head, positions, head_size, g=g, dtype=dtype)
    out, cache = attention.merge_heads_forward(y)
    assert torch.equal(out, makemore_merge(y))
    dout = rand(*out.shape, g=g, dtype=dtype)
    return Case(["y"], [attention.merge_heads_backward(dout, cache)], lambda y: attention.merge_heads_forward(y)[0],
                makemore_merge, dout, [y])


HEAD_SHAPES = {"T=5,nh=2,hs=3": (T, NH, 3), "T=1": (1, NH, 3), "T=2": (2, NH, 3), "hs=1": (T, 3, 1),
               "one-head": (T, 1, E)}


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_split_and_merge_heads_backward_match_autograd_and_finite_differences(shape, oracle):
    positions, n_head, head_size = HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(50)
    assert_gradients(split_heads_case(positions, n_head * head_size, n_head, g), oracle)
    assert_gradients(merge_heads_case(positions, n_head, head_size, g), oracle)


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_split_and_merge_heads_backward_are_bit_exact_with_autograd(shape, dtype):
    """They only move numbers: the gradients are autograd's exactly."""
    positions, n_head, head_size = HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(51)
    for case in (split_heads_case(positions, n_head * head_size, n_head, g, dtype),
                 merge_heads_case(positions, n_head, head_size, g, dtype)):
        assert_bit_exact(case.mine, autograd_grads(case), case.names)


@pytest.mark.parametrize("shape, n_head", [((B, T, 3 * E + 1), NH), ((B, T, 3 * E), 4), ((B, 3 * E), NH),
                                           ((B, T, 3 * E), 0)], ids=["not-3E", "E-not-by-heads", "2d", "no-heads"])
def test_split_heads_rejects_shapes_that_do_not_split(shape, n_head):
    with pytest.raises(ValueError, match=r"\(B, T, 3E\) qkv"):
        attention.split_heads_forward(torch.zeros(shape), n_head)


# ---------------------------------------------------------------------------------------------
# a whole pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)), composed from the ops

BLOCK_B, BLOCK_T, BLOCK_E, BLOCK_NH = 2, 3, 8, 2
BLOCK_PARAMS = ["ln1_weight", "ln1_bias", "attn_w", "attn_b", "attn_proj_w", "attn_proj_b",
                "ln2_weight", "ln2_bias", "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b"]


class BlockCache(NamedTuple):
    ln1: layernorm.LayerNormCache
    attn: LinearCache  # of c_attn, E -> 3E
    split: attention.SplitHeadsCache
    att: attention.CausalAttentionCache
    merge: attention.MergeHeadsCache
    attn_proj: LinearCache  # of the attention's c_proj, E -> E
    ln2: layernorm.LayerNormCache
    fc: LinearCache  # of c_fc, E -> 4E
    act: gelu.GELUCache
    mlp_proj: LinearCache  # of the MLP's c_proj, 4E -> E


def block_forward(x: Tensor, ln1_weight, ln1_bias, attn_w, attn_b, attn_proj_w, attn_proj_b,
                  ln2_weight, ln2_bias, fc_w, fc_b, mlp_proj_w, mlp_proj_b) -> tuple[Tensor, BlockCache]:
    h, ln1 = layernorm.layernorm_forward(x, ln1_weight, ln1_bias)  # (B, T, E)
    qkv, attn = linear_forward(h, attn_w, attn_b)  # (B, T, 3E)
    q, k, v, split = attention.split_heads_forward(qkv, BLOCK_NH)  # (B, nh, T, hs) each
    y, att = attention.causal_attention_forward(q, k, v)  # (B, nh, T, hs)
    y, merge = attention.merge_heads_forward(y)  # (B, T, E)
    a, attn_proj = linear_forward(y, attn_proj_w, attn_proj_b)  # (B, T, E)
    x1 = x + a  # (B, T, E)
    h2, ln2 = layernorm.layernorm_forward(x1, ln2_weight, ln2_bias)  # (B, T, E)
    f, fc = linear_forward(h2, fc_w, fc_b)  # (B, T, 4E)
    f, act = gelu.gelu_forward(f)  # (B, T, 4E)
    m, mlp_proj = linear_forward(f, mlp_proj_w, mlp_proj_b)  # (B, T, E)
    out = x1 + m  # (B, T, E)
    return out, BlockCache(ln1, attn, split, att, merge, attn_proj, ln2, fc, act, mlp_proj)


def block_backward(dout: Tensor, cache: BlockCache) -> list[Tensor]:
    """dx and the parameters' gradients, in block_forward's input order."""
    # In the forward pass this was: out = x1 + mlp(ln2(x1)): x1 feeds both branches
    df, dmlp_proj_w, dmlp_proj_b = linear_backward(dout, cache.mlp_proj)
    df = gelu.gelu_backward(df, cache.act)
    dh2, dfc_w, dfc_b = linear_backward(df, cache.fc)
    dx1_mlp, dln2_weight, dln2_bias = layernorm.layernorm_backward(dh2, cache.ln2)
    dx1 = dout + dx1_mlp  # the skip and the branch
    # In the forward pass this was: x1 = x + attn(ln1(x))
    dy, dattn_proj_w, dattn_proj_b = linear_backward(dx1, cache.attn_proj)
    dy = attention.merge_heads_backward(dy, cache.merge)
    dq, dk, dv = attention.causal_attention_backward(dy, cache.att)
    dqkv = attention.split_heads_backward(dq, dk, dv, cache.split)
    dh, dattn_w, dattn_b = linear_backward(dqkv, cache.attn)
    dx_attn, dln1_weight, dln1_bias = layernorm.layernorm_backward(dh, cache.ln1)
    dx = dx1 + dx_attn
    return [dx, dln1_weight, dln1_bias, dattn_w, dattn_b, dattn_proj_w, dattn_proj_b,
            dln2_weight, dln2_bias, dfc_w, dfc_b, dmlp_proj_w, dmlp_proj_b]


def makemore_block(x: Tensor, ln1_weight, ln1_bias, attn_w, attn_b, attn_proj_w, attn_proj_b,
                   ln2_weight, ln2_bias, fc_w, fc_b, mlp_proj_w, mlp_proj_b) -> Tensor:
    """makemore's Block.forward in torch's functions (weights (fan_in, fan_out), as the package's Linear;
    eps 1e-5, nn.LayerNorm's default)."""
    Bx, Tx, C = x.shape
    h = F.layer_norm(x, (C,), ln1_weight, ln1_bias, eps=1e-5)
    q, k, v = (h @ attn_w + attn_b).split(C, dim=2)
    q, k, v = (t.view(Bx, Tx, BLOCK_NH, C // BLOCK_NH).transpose(1, 2) for t in (q, k, v))
    y = makemore_attention(q, k, v).transpose(1, 2).contiguous().view(Bx, Tx, C)
    x = x + (y @ attn_proj_w + attn_proj_b)
    h = F.layer_norm(x, (C,), ln2_weight, ln2_bias, eps=1e-5)
    return x + (F.gelu(h @ fc_w + fc_b, approximate="tanh") @ mlp_proj_w + mlp_proj_b)


def block_case(g: torch.Generator) -> Case:
    width = BLOCK_E
    x = rand(BLOCK_B, BLOCK_T, width, g=g)

    def linear_params(fan_in: int, fan_out: int) -> list[Tensor]:
        return [rand(fan_in, fan_out, g=g) / fan_in**0.5, rand(fan_out, g=g) * 0.1]

    def ln_params() -> list[Tensor]:
        return [1 + 0.2 * rand(width, g=g), 0.1 * rand(width, g=g)]

    params = (ln_params() + linear_params(width, 3 * width) + linear_params(width, width) + ln_params()
              + linear_params(width, 4 * width) + linear_params(4 * width, width))
    out, cache = block_forward(x, *params)
    assert_right(out, makemore_block(x, *params), "the block vs makemore's Block")
    dout = rand(*out.shape, g=g)
    return Case(["x", *BLOCK_PARAMS], block_backward(dout, cache), lambda *a: block_forward(*a)[0], makemore_block,
                dout, [x, *params])


@pytest.mark.parametrize("oracle", ORACLES)
def test_a_pre_layernorm_block_from_the_ops_matches_autograd_for_every_parameter(oracle):
    assert_gradients(block_case(torch.Generator().manual_seed(60)), oracle)


# ---------------------------------------------------------------------------------------------
# the checks can fail: each backward with one term broken must be called wrong against both oracles

right = {name: getattr(module, name) for module, name in [
    (attention, "softmax_backward"), (attention, "causal_attention_backward"), (attention, "split_heads_backward"),
    (layernorm, "layernorm_backward"),
]}


def softmax_without_the_sum(dout: Tensor, cache: attention.SoftmaxCache) -> Tensor:
    return cache.out * dout  # the i = j term only


def layernorm_without(term: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """layernorm_backward with its term through the mean, or through the variance, left out."""

    def backward(dout: Tensor, cache: layernorm.LayerNormCache) -> tuple[Tensor, Tensor, Tensor]:
        _, dweight, dbias = right["layernorm_backward"](dout, cache)
        dxhat = dout * cache.weight
        term_mean = 0 if term == "mean" else dxhat.mean(-1, keepdim=True)
        term_var = 0 if term == "var" else (dxhat * cache.xhat).mean(-1, keepdim=True)
        return cache.rstd * (dxhat - term_mean - cache.xhat * term_var), dweight, dbias

    return backward


def attention_without_the_scale_on_dq(dy: Tensor, cache: attention.CausalAttentionCache):
    dq, dk, dv = right["causal_attention_backward"](dy, cache)
    return dq * math.sqrt(cache.q.shape[-1]), dk, dv  # dq = dscores @ k without 1/sqrt(hs)


BROKEN = {
    # name: (the module and attribute to replace, its broken value, the case that must then be wrong)
    "softmax-without-the-sum-term": (
        (attention, "softmax_backward"), softmax_without_the_sum, lambda g: softmax_case((B, NH, T, T), g)),
    "attention-through-softmax-without-the-sum-term": (
        (attention, "softmax_backward"), softmax_without_the_sum, lambda g: attention_case(T, NH, 3, g)),
    "attention-without-the-scale-on-dq": (
        (attention, "causal_attention_backward"), attention_without_the_scale_on_dq,
        lambda g: attention_case(T, NH, 3, g)),
    "attention-dq-and-dk-swapped": (
        (attention, "causal_attention_backward"), lambda dy, cache: (lambda dq, dk, dv: (dk, dq, dv))(
            *right["causal_attention_backward"](dy, cache)), lambda g: attention_case(T, NH, 3, g)),
    "layernorm-without-the-mean-term": (
        (layernorm, "layernorm_backward"), layernorm_without("mean"), lambda g: layernorm_case((B, T, E), g)),
    "layernorm-without-the-variance-term": (
        (layernorm, "layernorm_backward"), layernorm_without("var"), lambda g: layernorm_case((B, T, E), g)),
    "gelu-without-the-tanh-derivative": (
        (gelu, "gelu_backward"), lambda dout, cache: dout * 0.5 * (1 + cache.tanh_inner), gelu_case),
    "split-heads-q-and-k-swapped": (
        (attention, "split_heads_backward"), lambda dq, dk, dv, cache: right["split_heads_backward"](dk, dq, dv, cache),
        lambda g: split_heads_case(T, E, NH, g)),
    "merge-heads-without-the-transpose": (
        (attention, "merge_heads_backward"), lambda dout, cache: dout.reshape(B, cache.n_head, T, -1),
        lambda g: merge_heads_case(T, NH, 3, g)),
    "block-with-layernorm-without-the-mean-term": (
        (layernorm, "layernorm_backward"), layernorm_without("mean"), block_case),
}


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("broken", BROKEN)
def test_the_verdict_calls_a_broken_backward_wrong(broken, oracle, monkeypatch):
    (owner, attribute), wrong, make_case = BROKEN[broken]
    assert_gradients(make_case(torch.Generator().manual_seed(80)), oracle)  # right before the break
    monkeypatch.setattr(owner, attribute, wrong)
    case = make_case(torch.Generator().manual_seed(80))
    with pytest.raises(AssertionError, match=f"vs {oracle}: is off by"):
        assert_gradients(case, oracle)


def test_a_softmax_without_the_max_is_called_wrong_at_large_logits(monkeypatch):
    """The x100 check can fail: exp(logit) overflows float32 without the max, and the verdict says so."""
    case = softmax_case((B, NH, T, T), torch.Generator().manual_seed(81), LARGE, torch.float32)
    assert_gradients(case, "autograd")

    def naive(x: Tensor) -> tuple[Tensor, attention.SoftmaxCache]:
        e = x.exp()  # inf past 89
        return e / e.sum(-1, keepdim=True), attention.SoftmaxCache(e / e.sum(-1, keepdim=True))

    monkeypatch.setattr(attention, "softmax_forward", naive)
    with pytest.raises(AssertionError, match="softmax vs F.softmax: holds nan or inf"):
        softmax_case((B, NH, T, T), torch.Generator().manual_seed(81), LARGE, torch.float32)
    x = case.inputs[0]
    _, cache = naive(x)
    verdict = judge(attention.softmax_backward(case.dout, cache), autograd_grads(case)[0])
    assert not verdict.right and verdict.reason == "holds nan or inf"
