"""The sequence models' hand-written backwards (gates, sequence_loss, causal, recurrent) against two oracles.

Each op is differentiated through a "fake loss" (out * dout).sum() with a random, non-uniform upstream
dout, so every entry of every gradient is tested, not only their sum; the oracles are autograd on the
same maths written in plain torch (makemore's lines) and float64 central finite differences of the
op's own forward. Shapes are small and odd (B=3, T=5, E=7, H=9, V=11; fan-in E+H = 16) so that a
transposed or mis-broadcast gradient cannot pass, and T = 1 and T = 2 are the edge cases of the
recurrence. The last tests break one term of each backward and show that both oracles catch it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.ops import recurrent

sys.path.insert(0, str(Path(__file__).parent))

from op_cases import Case, autograd_grads, finite_difference_grads  # noqa: E402

B, T, E, H, V = 3, 5, 7, 9, 11
FAN_IN = E + H  # a recurrent cell's Linear reads [x_t, h_{t-1}]

# float64, same formula up to summation order: agreement to rounding noise, 1e-16..1e-14;
# a wrong backward is off by the size of the gradient itself (1e-2 and up).
AUTOGRAD_RTOL = 1e-10
AUTOGRAD_ATOL = 1e-12
# torch.autograd.gradcheck's defaults for float64 central differences with eps 1e-6 (verdict.FD_EPS,
# op_cases): correct gradients land at 1e-9..1e-11 from the finite differences.
FD_ATOL = 1e-5
FD_RTOL = 1e-3

DOUBLE = torch.float64
ORACLES = ["autograd", "finite-differences"]


def rand(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=DOUBLE)


def assert_gradients(case: Case, oracle: str) -> None:
    if oracle == "autograd":
        references, rtol, atol = autograd_grads(case), AUTOGRAD_RTOL, AUTOGRAD_ATOL
    else:
        references, rtol, atol = finite_difference_grads(case), FD_RTOL, FD_ATOL
    assert len(case.mine) == len(case.inputs)
    for name, mine, ref, x in zip(case.names, case.mine, references, case.inputs):
        assert mine.shape == x.shape, f"d{name}: shape {tuple(mine.shape)}, its input's {tuple(x.shape)}"
        torch.testing.assert_close(mine, ref, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d{name} vs {oracle}: {m}")


# ---------------------------------------------------------------------------------------------
# sigmoid


def sigmoid_case(g: torch.Generator) -> Case:
    x = rand(B, T, H, g=g) * 3
    out, cache = ops.sigmoid_forward(x)
    torch.testing.assert_close(out, torch.sigmoid(x), rtol=0, atol=0)
    dout = rand(*out.shape, g=g)
    dx = ops.sigmoid_backward(dout, cache)
    return Case(["x"], [dx], lambda x: ops.sigmoid_forward(x)[0], lambda x: 1 / (1 + torch.exp(-x)), dout, [x])


@pytest.mark.parametrize("oracle", ORACLES)
def test_sigmoid_backward_matches_autograd_and_finite_differences(oracle):
    assert_gradients(sigmoid_case(torch.Generator().manual_seed(10)), oracle)


def test_sigmoid_backward_is_bit_exact_with_autograd_in_float32():
    """dout * (1 - s) * s, in autograd's order: the same roundings."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn((64, 200), generator=g) * 4
    dout = torch.randn((64, 200), generator=g)
    leaf = x.clone().requires_grad_(True)
    (torch.sigmoid(leaf) * dout).sum().backward()
    _, cache = ops.sigmoid_forward(x)
    assert torch.equal(ops.sigmoid_backward(dout, cache), leaf.grad)


# ---------------------------------------------------------------------------------------------
# sequence cross-entropy


def makemore_targets(g: torch.Generator) -> Tensor:
    """(B, T) targets as makemore pads them: a word's characters, then -1 after its end."""
    targets = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    lengths = torch.tensor([T, 2, 4])  # how many positions of each row predict something
    targets[torch.arange(T) >= lengths.view(B, 1)] = ops.IGNORE_INDEX
    return targets


def cross_entropy_reference(logits: Tensor, targets: Tensor) -> Tensor:
    """-log softmax at the correct class, averaged over the predicted positions only."""
    b, t = (targets != -1).nonzero(as_tuple=True)
    return -logits.log_softmax(-1)[b, t, targets[b, t]].mean()


def sequence_cross_entropy_case(logits: Tensor, targets: Tensor) -> Case:
    loss, cache = ops.sequence_cross_entropy_forward(logits, targets)
    makemore = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, makemore, rtol=1e-15, atol=0)
    dlogits = ops.sequence_cross_entropy_backward(cache)

    one = torch.ones((), dtype=DOUBLE)  # the loss is the end of the graph: dloss = 1
    return Case(["logits"], [dlogits], lambda z: ops.sequence_cross_entropy_forward(z, targets)[0],
                lambda z: cross_entropy_reference(z, targets), one, [logits])


def padded_cross_entropy_case(g: torch.Generator) -> Case:
    return sequence_cross_entropy_case(rand(B, T, V, g=g) * 3, makemore_targets(g))


@pytest.mark.parametrize("oracle", ORACLES)
def test_sequence_cross_entropy_backward_matches_autograd_and_finite_differences(oracle):
    assert_gradients(padded_cross_entropy_case(torch.Generator().manual_seed(20)), oracle)


def test_sequence_cross_entropy_averages_over_predicted_characters_and_ignored_get_zero():
    g = torch.Generator().manual_seed(21)
    logits, targets = rand(B, T, V, g=g), makemore_targets(g)
    loss, cache = ops.sequence_cross_entropy_forward(logits, targets)
    predicted = targets != -1
    assert cache.count == int(predicted.sum()) == T + 2 + 4
    per_position = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    torch.testing.assert_close(loss, per_position[predicted].sum() / cache.count, rtol=1e-14, atol=0)
    dlogits = ops.sequence_cross_entropy_backward(cache)
    assert (dlogits[~predicted] == 0).all()  # exactly: no term of the loss reads them
    assert (dlogits[predicted] != 0).all()
    # each predicted row is (softmax - one_hot) / n: it sums to zero
    torch.testing.assert_close(dlogits.sum(-1), torch.zeros(B, T, dtype=DOUBLE), rtol=0, atol=1e-15)


@pytest.mark.parametrize("oracle", ORACLES)
def test_sequence_cross_entropy_with_every_target_ignored_but_one(oracle):
    g = torch.Generator().manual_seed(22)
    logits = rand(B, T, V, g=g) * 3
    targets = torch.full((B, T), ops.IGNORE_INDEX)
    targets[1, 3] = 4
    case = sequence_cross_entropy_case(logits, targets)
    loss, _ = ops.sequence_cross_entropy_forward(logits, targets)
    torch.testing.assert_close(loss, -logits[1, 3].log_softmax(-1)[4], rtol=1e-15, atol=0)
    (dlogits,) = case.mine
    expected = torch.zeros_like(logits)  # the one predicted row: softmax - one_hot, over n = 1
    expected[1, 3] = logits[1, 3].softmax(-1) - F.one_hot(torch.tensor(4), V)
    torch.testing.assert_close(dlogits, expected, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    assert_gradients(case, oracle)


def test_sequence_cross_entropy_rejects_a_batch_with_no_predicted_character():
    targets = torch.full((B, T), ops.IGNORE_INDEX)
    with pytest.raises(ValueError, match="no predicted character"):
        ops.sequence_cross_entropy_forward(torch.zeros(B, T, V), targets)


@pytest.mark.parametrize("bad, message", [
    (torch.full((B, T), V), r"targets must be classes in \[0, 11\) or -1"),
    (torch.full((B, T), -2), r"targets must be classes in \[0, 11\) or -1"),
    (torch.zeros(B, T + 1, dtype=torch.int64), r"\(B, T, V\) logits and \(B, T\) targets"),
], ids=["too-large", "below-minus-one", "shape"])
def test_sequence_cross_entropy_rejects_targets_that_are_not_classes(bad, message):
    with pytest.raises(ValueError, match=message):
        ops.sequence_cross_entropy_forward(torch.zeros(B, T, V), bad)


def test_sequence_cross_entropy_is_stable_for_huge_logits_even_where_ignored():
    logits = torch.tensor([[[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]]])  # (1, 2, 3)
    loss, cache = ops.sequence_cross_entropy_forward(logits, torch.tensor([[1, -1]]))
    dlogits = ops.sequence_cross_entropy_backward(cache)
    assert torch.isfinite(loss) and torch.isfinite(dlogits).all()
    torch.testing.assert_close(dlogits, torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]]))


# ---------------------------------------------------------------------------------------------
# causal bag of words


def makemore_bow(x: Tensor) -> Tensor:
    """makemore's CausalBoW: uniform attention over the past, a masked softmax of zeros."""
    T = x.shape[1]
    tril = torch.tril(torch.ones(T, T))
    att = torch.zeros(T, T, dtype=x.dtype).masked_fill(tril == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ x


def causal_bow_case(positions: int, g: torch.Generator) -> Case:
    x = rand(B, positions, E, g=g)
    out, cache = ops.causal_bow_forward(x)
    torch.testing.assert_close(out, makemore_bow(x), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    torch.testing.assert_close(out[:, -1], x.mean(1), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    dout = rand(*out.shape, g=g)
    dx = ops.causal_bow_backward(dout, cache)
    return Case(["x"], [dx], lambda x: ops.causal_bow_forward(x)[0], makemore_bow, dout, [x])


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("positions", [1, 2, T])
def test_causal_bow_backward_matches_autograd_and_finite_differences(positions, oracle):
    assert_gradients(causal_bow_case(positions, torch.Generator().manual_seed(30 + positions)), oracle)


def test_causal_bow_of_one_position_is_the_identity():
    x = rand(B, 1, E, g=torch.Generator().manual_seed(31))
    out, cache = ops.causal_bow_forward(x)
    assert torch.equal(out, x)
    assert torch.equal(ops.causal_bow_backward(x, cache), x)


# ---------------------------------------------------------------------------------------------
# recurrent cells: makemore's lines, for autograd


def makemore_rnn_cell(x: Tensor, h_prev: Tensor, w: Tensor, b: Tensor) -> Tensor:
    xh = torch.cat([x, h_prev], dim=1)
    return torch.tanh(xh @ w + b)


def makemore_gru_cell(x: Tensor, h_prev: Tensor, w_r: Tensor, b_r: Tensor, w_hbar: Tensor, b_hbar: Tensor,
                      w_z: Tensor, b_z: Tensor) -> Tensor:
    xh = torch.cat([x, h_prev], dim=1)
    r = torch.sigmoid(xh @ w_r + b_r)
    hprev_reset = r * h_prev
    xhr = torch.cat([x, hprev_reset], dim=1)
    hbar = torch.tanh(xhr @ w_hbar + b_hbar)
    z = torch.sigmoid(xh @ w_z + b_z)
    return (1 - z) * h_prev + z * hbar


def makemore_unrolled(cell: Callable[..., Tensor], x: Tensor, h0: Tensor, *weights: Tensor,
                      keep: list[Tensor] | None = None) -> Tensor:
    """makemore's RNN.forward: the start state expanded over the batch, the cell over the positions."""
    h = h0.expand(x.shape[0], -1)
    hiddens = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h, *weights)
        if keep is not None:
            h.retain_grad()
            keep.append(h)
        hiddens.append(h)
    return torch.stack(hiddens, 1)


def cell_weights(count: int, g: torch.Generator) -> list[Tensor]:
    """count (W, b) pairs, W (E+H, H) scaled by 1/sqrt(fan_in) so the gates and tanh are not saturated."""
    weights = []
    for _ in range(count):
        weights += [rand(FAN_IN, H, g=g) / FAN_IN**0.5, rand(H, g=g) * 0.5]
    return weights


RNN_WEIGHT_NAMES = ["W", "b"]
GRU_WEIGHT_NAMES = ["W_r", "b_r", "W_hbar", "b_hbar", "W_z", "b_z"]


# ---------------------------------------------------------------------------------------------
# one step


def rnn_step_case(g: torch.Generator) -> Case:
    x, h_prev, weights = rand(B, E, g=g), rand(B, H, g=g) * 0.5, cell_weights(1, g)
    h, cache = ops.rnn_step_forward(x, h_prev, *weights)
    torch.testing.assert_close(h, makemore_rnn_cell(x, h_prev, *weights), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    dh = rand(*h.shape, g=g)
    mine = list(ops.rnn_step_backward(dh, cache))
    return Case(["x", "h_prev", *RNN_WEIGHT_NAMES], mine, lambda *a: ops.rnn_step_forward(*a)[0],
                makemore_rnn_cell, dh, [x, h_prev, *weights])


def gru_step_case(g: torch.Generator) -> Case:
    x, h_prev, weights = rand(B, E, g=g), rand(B, H, g=g) * 0.5, cell_weights(3, g)
    h, cache = ops.gru_step_forward(x, h_prev, *weights)
    torch.testing.assert_close(h, makemore_gru_cell(x, h_prev, *weights), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    dh = rand(*h.shape, g=g)
    mine = list(ops.gru_step_backward(dh, cache))
    return Case(["x", "h_prev", *GRU_WEIGHT_NAMES], mine, lambda *a: ops.gru_step_forward(*a)[0],
                makemore_gru_cell, dh, [x, h_prev, *weights])


@pytest.mark.parametrize("oracle", ORACLES)
def test_rnn_step_backward_matches_autograd_and_finite_differences(oracle):
    assert_gradients(rnn_step_case(torch.Generator().manual_seed(40)), oracle)


@pytest.mark.parametrize("oracle", ORACLES)
def test_gru_step_backward_matches_autograd_and_finite_differences(oracle):
    assert_gradients(gru_step_case(torch.Generator().manual_seed(41)), oracle)


# ---------------------------------------------------------------------------------------------
# over a sequence: backpropagation through time

START_ROWS = {"per-example-h0": B, "broadcast-h0": 1}  # h0 (B, H), or makemore's learned (1, H) start


class Recurrence(NamedTuple):
    forward: Callable[..., tuple[Tensor, tuple]]
    backward: Callable[..., tuple[Tensor, ...]]
    cell: Callable[..., Tensor]  # makemore's cell, for autograd
    pairs: int  # (W, b) pairs
    names: list[str]


RECURRENCES = {
    "rnn": Recurrence(ops.rnn_forward, ops.rnn_backward, makemore_rnn_cell, 1, RNN_WEIGHT_NAMES),
    "gru": Recurrence(ops.gru_forward, ops.gru_backward, makemore_gru_cell, 3, GRU_WEIGHT_NAMES),
}


class SequenceCase(NamedTuple):
    case: Case
    dh: Tensor  # (B, T, H) dL/dh_t as the backward returned it


def sequence_case(kind: str, positions: int, start_rows: int, g: torch.Generator) -> SequenceCase:
    rec = RECURRENCES[kind]
    x, h0, weights = rand(B, positions, E, g=g), rand(start_rows, H, g=g) * 0.5, cell_weights(rec.pairs, g)
    out, cache = rec.forward(x, h0, *weights)
    reference = makemore_unrolled(rec.cell, x, h0, *weights)
    assert out.shape == (B, positions, H)
    torch.testing.assert_close(out, reference, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    dout = rand(*out.shape, g=g)
    *mine, dh = rec.backward(dout, cache)

    def unrolled(x: Tensor, h0: Tensor, *weights: Tensor) -> Tensor:
        return makemore_unrolled(rec.cell, x, h0, *weights)

    case = Case(["x", "h0", *rec.names], mine, lambda *a: rec.forward(*a)[0], unrolled, dout, [x, h0, *weights])
    return SequenceCase(case, dh)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("start", START_ROWS)
@pytest.mark.parametrize("positions", [1, 2, T], ids=["T=1", "T=2", f"T={T}"])
@pytest.mark.parametrize("kind", RECURRENCES)
def test_sequence_backward_matches_autograd_and_finite_differences(kind, positions, start, oracle):
    seed = 50 + 10 * list(RECURRENCES).index(kind) + positions
    g = torch.Generator().manual_seed(seed)
    assert_gradients(sequence_case(kind, positions, START_ROWS[start], g).case, oracle)


@pytest.mark.parametrize("start", START_ROWS)
@pytest.mark.parametrize("kind", RECURRENCES)
def test_sequence_backward_returns_dL_dh_at_every_step(kind, start):
    """dh[:, t] = dL/dh_t, the total gradient (from the output and from step t+1), as autograd sees it."""
    g = torch.Generator().manual_seed(70)
    rec = RECURRENCES[kind]
    seq = sequence_case(kind, T, START_ROWS[start], g)
    x, h0, *weights = [x.detach().clone().requires_grad_(True) for x in seq.case.inputs]
    hiddens: list[Tensor] = []
    (makemore_unrolled(rec.cell, x, h0, *weights, keep=hiddens) * seq.case.dout).sum().backward()
    expected = torch.stack([h.grad for h in hiddens], dim=1)  # (B, T, H)
    assert seq.dh.shape == expected.shape
    torch.testing.assert_close(seq.dh, expected, rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)
    # the last step's gradient comes from the output alone; the earlier ones add the next step's
    assert torch.equal(seq.dh[:, -1], seq.case.dout[:, -1])
    assert not torch.allclose(seq.dh[:, :-1], seq.case.dout[:, :-1])


@pytest.mark.parametrize("kind", RECURRENCES)
def test_a_sequence_of_one_step_is_the_step(kind):
    """T = 1: no next step, so dL/dh_0 is dout[:, 0] and dh0 is that step's dh_prev."""
    g = torch.Generator().manual_seed(71)
    rec = RECURRENCES[kind]
    step_forward, step_backward = {"rnn": (ops.rnn_step_forward, ops.rnn_step_backward),
                                   "gru": (ops.gru_step_forward, ops.gru_step_backward)}[kind]
    x, h0, weights = rand(B, 1, E, g=g), rand(B, H, g=g), cell_weights(rec.pairs, g)
    out, cache = rec.forward(x, h0, *weights)
    dout = rand(*out.shape, g=g)
    dx, dh0, *dweights, dh = rec.backward(dout, cache)
    h, step_cache = step_forward(x[:, 0], h0, *weights)
    assert torch.equal(out[:, 0], h)
    step_dx, step_dh_prev, *step_dweights = step_backward(dout[:, 0], step_cache)
    assert torch.equal(dx[:, 0], step_dx) and torch.equal(dh0, step_dh_prev)
    assert all(torch.equal(a, b) for a, b in zip(dweights, step_dweights))
    assert torch.equal(dh, dout)


@pytest.mark.parametrize("kind", RECURRENCES)
def test_a_broadcast_start_state_gets_the_sum_over_the_batch(kind):
    g = torch.Generator().manual_seed(72)
    rec = RECURRENCES[kind]
    x, h0, weights = rand(B, 2, E, g=g), rand(1, H, g=g), cell_weights(rec.pairs, g)
    dout = rand(B, 2, H, g=g)
    _, broadcast = rec.forward(x, h0, *weights)
    _, expanded = rec.forward(x, h0.expand(B, H).clone(), *weights)
    dh0_broadcast = rec.backward(dout, broadcast)[1]
    dh0_expanded = rec.backward(dout, expanded)[1]
    assert dh0_broadcast.shape == (1, H) and dh0_expanded.shape == (B, H)
    torch.testing.assert_close(dh0_broadcast, dh0_expanded.sum(0, keepdim=True), rtol=AUTOGRAD_RTOL, atol=AUTOGRAD_ATOL)


@pytest.mark.parametrize("x_shape, h0_shape, message", [
    ((B, 0, E), (1, H), r"T >= 1"),
    ((B, E), (1, H), r"\(B, T, E\)"),
    ((B, T, E), (2, H), rf"\({B}, {H}\) or \(1, {H}\)"),
    ((B, T, E), (H,), rf"\({B}, {H}\) or \(1, {H}\)"),
    ((B, T, E), (B, H + 1), rf"\({B}, {H}\) or \(1, {H}\)"),
], ids=["no-positions", "2d-input", "rows", "1d-start", "width"])
@pytest.mark.parametrize("kind", RECURRENCES)
def test_sequence_forward_rejects_bad_shapes(kind, x_shape, h0_shape, message):
    rec = RECURRENCES[kind]
    weights = cell_weights(rec.pairs, torch.Generator().manual_seed(73))
    with pytest.raises(ValueError, match=message):
        rec.forward(torch.zeros(x_shape, dtype=DOUBLE), torch.zeros(h0_shape, dtype=DOUBLE), *weights)


# ---------------------------------------------------------------------------------------------
# the checks can fail: each backward with one term broken must fail against both oracles


def truncated(step_backward: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    """A step backward whose gradient never reaches the previous step: backpropagation through one step."""

    def backward(dh: Tensor, cache: tuple) -> tuple[Tensor, ...]:
        dx, dh_prev, *dweights = step_backward(dh, cache)
        return (dx, torch.zeros_like(dh_prev), *dweights)

    return backward


right_sequence_cross_entropy_backward = ops.sequence_cross_entropy_backward


def over_all_positions(cache: ops.SequenceCrossEntropyCache) -> Tensor:
    """The mean taken over all B*T positions, padding included, instead of the predicted characters."""
    return right_sequence_cross_entropy_backward(cache._replace(count=cache.predicted.numel()))

BROKEN = {
    # name: (the object and attribute to replace, its broken value, the case that must then fail)
    "sigmoid-without-1-minus-s": (
        (ops, "sigmoid_backward"), lambda dout, cache: dout * cache.out, sigmoid_case),
    "loss-averaged-over-padding-too": (
        (ops, "sequence_cross_entropy_backward"), over_all_positions, padded_cross_entropy_case),
    "bow-gradient-sent-to-the-past": (
        (ops, "causal_bow_backward"), lambda dout, cache: (dout / cache.counts).cumsum(1),
        lambda g: causal_bow_case(T, g)),
    "rnn-step-without-tanh-derivative": (
        (recurrent, "tanh_backward"), lambda dout, cache: dout, rnn_step_case),
    "gru-step-without-sigmoid-derivative": (
        (recurrent, "sigmoid_backward"), lambda dout, cache: dout * cache.out, gru_step_case),
    "rnn-through-one-step-only": (
        (recurrent, "rnn_step_backward"), truncated(ops.rnn_step_backward),
        lambda g: sequence_case("rnn", 2, B, g).case),
    "gru-through-one-step-only": (
        (recurrent, "gru_step_backward"), truncated(ops.gru_step_backward),
        lambda g: sequence_case("gru", 2, 1, g).case),
}


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("broken", BROKEN)
def test_the_checks_fail_on_a_broken_backward(broken, oracle, monkeypatch):
    (owner, attribute), wrong, make_case = BROKEN[broken]
    assert_gradients(make_case(torch.Generator().manual_seed(80)), oracle)  # right before the break
    monkeypatch.setattr(owner, attribute, wrong)
    case = make_case(torch.Generator().manual_seed(80))
    with pytest.raises(AssertionError, match=f"vs {oracle}"):
        assert_gradients(case, oracle)


# ---------------------------------------------------------------------------------------------
# the sequence ops against the step functions chained one position at a time
#
# rnn_forward/backward and gru_forward/backward keep only the recurrence in their time loops and run
# the step backward once over all B*T positions (ops/recurrent.py). The readable path is the step
# functions chained, written out below; the forward must be it bit for bit (the same products), the
# backward within the rounding of another summation order, by the package's verdict
# (checking/verdict.py: ROUNDING_ULPS units in the last place of the gradient's scale, never less
# than SCALE_FLOOR of the largest gradient), in float64 and in float32.

from backprop_ninja.checking.verdict import gradient_scale, judge, scale_floor  # noqa: E402

STEP_FUNCTIONS = {"rnn": (ops.rnn_step_forward, ops.rnn_step_backward),
                  "gru": (ops.gru_step_forward, ops.gru_step_backward)}
# (B, T, E, H): the file's shapes at T = 1, 2 and 5, then odd ones: one example, E < H, H < E, T = 7
CHAIN_SHAPES = [(B, 1, E, H), (B, 2, E, H), (B, T, E, H), (1, 3, 2, 5), (4, 7, 5, 3)]


def chained_steps(kind: str, x: Tensor, h0: Tensor, weights: list[Tensor]):
    """The step functions over the positions of x from h0, one at a time: the states (B, T, H), each
    step's h, and the backward through time over the step caches (dx, dh0, the weights', dh)."""
    step_forward, step_backward = STEP_FUNCTIONS[kind]
    batch, positions = x.shape[:2]
    h = h0.expand(batch, -1)  # (B, H)
    hs, caches = [], []
    for t in range(positions):
        h, cache = step_forward(x[:, t], h, *weights)  # (B, H)
        hs.append(h)
        caches.append(cache)

    def backward(dout: Tensor) -> list[Tensor]:
        dxs, dhs, dweights = [None] * positions, [None] * positions, None
        dh_next = torch.zeros_like(dout[:, 0])  # (B, H) nothing comes after the last step
        for t in reversed(range(positions)):
            dh = dout[:, t] + dh_next  # (B, H) dL/dh_t: from the output and from step t+1
            dhs[t] = dh
            dxs[t], dh_next, *dstep = step_backward(dh, caches[t])
            dweights = dstep if dweights is None else [total + d for total, d in zip(dweights, dstep)]
        dh0 = dh_next if h0.shape[0] == batch else dh_next.sum(0, keepdim=True)  # (B, H) or (1, H)
        return [torch.stack(dxs, dim=1), dh0, *dweights, torch.stack(dhs, dim=1)]

    return torch.stack(hs, dim=1), hs, caches, backward


def sequence_inputs(kind: str, shape: tuple[int, int, int, int], start_rows: int, dtype: torch.dtype, seed: int):
    batch, positions, width, hidden = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, positions, width), generator=g, dtype=dtype)  # (B, T, E)
    h0 = torch.randn((start_rows if start_rows == 1 else batch, hidden), generator=g, dtype=dtype) * 0.5
    weights = []
    for _ in range(RECURRENCES[kind].pairs):  # W (E+H, H) scaled by 1/sqrt(fan_in): gates not saturated
        fan_in = width + hidden
        weights += [torch.randn((fan_in, hidden), generator=g, dtype=dtype) / fan_in**0.5,
                    torch.randn(hidden, generator=g, dtype=dtype) * 0.5]
    dout = torch.randn((batch, positions, hidden), generator=g, dtype=dtype)  # (B, T, H)
    return x, h0, weights, dout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("start", START_ROWS)
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=[f"B{b}-T{t}-E{e}-H{h}" for b, t, e, h in CHAIN_SHAPES])
@pytest.mark.parametrize("kind", RECURRENCES)
def test_the_sequence_ops_equal_the_step_functions_chained(kind, shape, start, dtype):
    rec = RECURRENCES[kind]
    x, h0, weights, dout = sequence_inputs(kind, shape, START_ROWS[start], dtype, seed=90 + shape[1])
    out, cache = rec.forward(x, h0, *weights)
    chain_out, chain_hs, _, chain_backward = chained_steps(kind, x, h0, weights)
    assert torch.equal(out, chain_out)  # the same products: bit for bit
    assert len(cache.states) == shape[1] and all(torch.equal(a, b) for a, b in zip(cache.states, chain_hs))

    mine, references = list(rec.backward(dout, cache)), chain_backward(dout)
    names = ["x", "h0", *rec.names, "dh"]
    floor = scale_floor(references)
    for name, grad, reference in zip(names, mine, references, strict=True):
        verdict = judge(grad, reference, max(gradient_scale(reference), floor))
        assert grad.shape == reference.shape and verdict.right, f"d{name}: {verdict}"
    assert torch.equal(mine[-1][:, -1], dout[:, -1])  # the last step's dL/dh_t: its output's alone


@pytest.mark.parametrize("kind", RECURRENCES)
def test_the_sequence_caches_steps_are_the_step_functions_caches(kind):
    """cache.steps holds each position's step cache, as the chain makes them: the step backward of
    each gives what it gives on the chain's own cache, bit for bit."""
    rec = RECURRENCES[kind]
    x, h0, weights, dout = sequence_inputs(kind, (B, T, E, H), 1, DOUBLE, seed=97)
    _, cache = rec.forward(x, h0, *weights)
    _, _, chain_caches, _ = chained_steps(kind, x, h0, weights)
    step_backward = STEP_FUNCTIONS[kind][1]
    assert len(cache.steps) == T
    for t, (rebuilt, chained) in enumerate(zip(cache.steps, chain_caches)):
        for a, b in zip(step_backward(dout[:, t], rebuilt), step_backward(dout[:, t], chained), strict=True):
            assert torch.equal(a, b), f"step {t}"


# ---------------------------------------------------------------------------------------------
# sequence cross-entropy: the scatter formulation against the indexed one, in float32


def indexed_sequence_cross_entropy_backward(probs: Tensor, targets: Tensor) -> Tensor:
    """softmax - one_hot at the predicted positions (found by nonzero), over n; 0 at the ignored ones."""
    predicted = targets != -1
    dlogits = probs.clone()
    b, t = predicted.nonzero(as_tuple=True)
    dlogits[b, t, targets[b, t]] -= 1
    dlogits /= int(predicted.sum())
    dlogits[~predicted] = 0
    return dlogits


def test_sequence_cross_entropy_is_makemores_loss_and_the_indexed_gradient_bit_for_bit():
    g = torch.Generator().manual_seed(98)
    logits = torch.randn((32, 16, 27), generator=g) * 3  # makemore's batch, block and vocabulary
    targets = torch.randint(0, 27, (32, 16), generator=g)
    targets[torch.arange(16) >= torch.randint(1, 17, (32, 1), generator=g)] = ops.IGNORE_INDEX
    loss, cache = ops.sequence_cross_entropy_forward(logits, targets)
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, 27), targets.view(-1), ignore_index=-1))
    torch.testing.assert_close(cache.probs, logits.softmax(-1))  # float32 defaults: a last-bit difference
    dlogits = ops.sequence_cross_entropy_backward(cache)
    assert torch.equal(dlogits, indexed_sequence_cross_entropy_backward(cache.probs, targets))
    assert not torch.signbit(dlogits[targets == -1]).any()  # +0 exactly at the ignored positions
