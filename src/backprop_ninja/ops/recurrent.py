"""makemore's recurrent cells, one step and unrolled over a sequence, with backpropagation through time.

Built from the ops below them (linear, tanh, sigmoid), so each step's backward is theirs, chained.
Conventions (dimension letters, the gradient policy, weights (fan_in, fan_out)): backprop_ninja.conventions.
Here a cell's Linear reads [x_t, h_{t-1}]: fan_in E + H, fan_out H, so every W is (E+H, H), every b (H,).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.ops.activations import TanhCache, tanh_backward, tanh_forward
from backprop_ninja.ops.gates import SigmoidCache, sigmoid_backward, sigmoid_forward
from backprop_ninja.ops.linear import LinearCache, linear_backward, linear_forward

# ---------------------------------------------------------------------------------------------
# RNN cell (makemore's RNNCell): h_t = tanh([x_t, h_{t-1}] @ W + b)


class RNNStepCache(NamedTuple):
    linear: LinearCache  # of xh @ W + b; holds xh = [x_t, h_{t-1}], (B, E+H)
    tanh: TanhCache  # of h_t = tanh(...)
    input_width: int  # E, where xh splits back into x_t and h_{t-1}


def rnn_step_forward(x: Tensor, h_prev: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, RNNStepCache]:
    """x (B, E), h_prev (B, H), w (E+H, H), b (H,) -> h (B, H)."""
    xh = torch.cat([x, h_prev], dim=1)  # (B, E+H)
    pre, linear = linear_forward(xh, w, b)  # (B, H)
    h, tanh = tanh_forward(pre)  # (B, H)
    return h, RNNStepCache(linear, tanh, x.shape[1])


def rnn_step_backward(dh: Tensor, cache: RNNStepCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dh_prev, dW, db.

    In the forward pass this was: xh = torch.cat([x, h_prev], 1); h = tanh(xh @ W + b).
    Back through the tanh, then the Linear; the concatenation's gradient splits back into its parts.
    """
    dpre = tanh_backward(dh, cache.tanh)  # (B, H)
    dxh, dw, db = linear_backward(dpre, cache.linear)  # (B, E+H), (E+H, H), (H,)
    dx, dh_prev = dxh.split([cache.input_width, dxh.shape[1] - cache.input_width], dim=1)  # (B, E), (B, H)
    return dx, dh_prev, dw, db


# ---------------------------------------------------------------------------------------------
# GRU cell (makemore's GRUCell), with xh = [x_t, h_{t-1}]:
#     r = sigmoid(xh @ W_r + b_r)                          the reset gate
#     hbar = tanh([x_t, r * h_{t-1}] @ W_hbar + b_hbar)    the candidate state
#     z = sigmoid(xh @ W_z + b_z)                          the update gate
#     h_t = (1 - z) * h_{t-1} + z * hbar                   between the old state and the candidate


class GRUStepCache(NamedTuple):
    h_prev: Tensor  # (B, H) h_{t-1}
    r_linear: LinearCache  # of xh @ W_r + b_r; holds xh, (B, E+H)
    r: SigmoidCache  # the reset gate r, (B, H)
    hbar_linear: LinearCache  # of xhr @ W_hbar + b_hbar; holds xhr = [x_t, r * h_{t-1}], (B, E+H)
    hbar: TanhCache  # the candidate hbar, (B, H)
    z_linear: LinearCache  # of xh @ W_z + b_z
    z: SigmoidCache  # the update gate z, (B, H)
    input_width: int  # E


def gru_step_forward(
    x: Tensor, h_prev: Tensor, w_r: Tensor, b_r: Tensor, w_hbar: Tensor, b_hbar: Tensor, w_z: Tensor, b_z: Tensor
) -> tuple[Tensor, GRUStepCache]:
    """x (B, E), h_prev (B, H), every w (E+H, H), every b (H,) -> h (B, H)."""
    xh = torch.cat([x, h_prev], dim=1)  # (B, E+H)
    r_pre, r_linear = linear_forward(xh, w_r, b_r)  # (B, H)
    r, r_cache = sigmoid_forward(r_pre)  # (B, H)
    h_reset = r * h_prev  # (B, H)
    xhr = torch.cat([x, h_reset], dim=1)  # (B, E+H)
    hbar_pre, hbar_linear = linear_forward(xhr, w_hbar, b_hbar)  # (B, H)
    hbar, hbar_cache = tanh_forward(hbar_pre)  # (B, H)
    z_pre, z_linear = linear_forward(xh, w_z, b_z)  # (B, H)
    z, z_cache = sigmoid_forward(z_pre)  # (B, H)
    h = (1 - z) * h_prev + z * hbar  # (B, H)
    return h, GRUStepCache(h_prev, r_linear, r_cache, hbar_linear, hbar_cache, z_linear, z_cache, x.shape[1])


def gru_step_backward(dh: Tensor, cache: GRUStepCache) -> tuple[Tensor, ...]:
    """Returns dx, dh_prev, dW_r, db_r, dW_hbar, db_hbar, dW_z, db_z, in the forward's input order.

    h_{t-1} reaches h_t by four paths (directly, through r * h_{t-1}, and through xh into r and z),
    x_t by three (xh into r and z, and xhr): dh_prev and dx are the sums of those terms.
    """
    E = cache.input_width
    h_prev, r, z, hbar = cache.h_prev, cache.r.out, cache.z.out, cache.hbar.out
    # In the forward pass this was: h = (1 - z) * h_prev + z * hbar
    dz = dh * (hbar - h_prev)  # (B, H)
    dhbar = dh * z  # (B, H)
    dh_prev_direct = dh * (1 - z)  # (B, H) term 1 of dh_prev
    # In the forward pass this was: z = sigmoid(xh @ W_z + b_z)
    dz_pre = sigmoid_backward(dz, cache.z)  # (B, H)
    dxh_z, dw_z, db_z = linear_backward(dz_pre, cache.z_linear)  # (B, E+H), (E+H, H), (H,)
    # In the forward pass this was: hbar = tanh(xhr @ W_hbar + b_hbar), xhr = torch.cat([x, r * h_prev], 1)
    dhbar_pre = tanh_backward(dhbar, cache.hbar)  # (B, H)
    dxhr, dw_hbar, db_hbar = linear_backward(dhbar_pre, cache.hbar_linear)  # (B, E+H), (E+H, H), (H,)
    dx_hbar, dh_reset = dxhr.split([E, dxhr.shape[1] - E], dim=1)  # (B, E), (B, H)
    # In the forward pass this was: h_reset = r * h_prev
    dr = dh_reset * h_prev  # (B, H)
    dh_prev_reset = dh_reset * r  # (B, H) term 2 of dh_prev
    # In the forward pass this was: r = sigmoid(xh @ W_r + b_r)
    dr_pre = sigmoid_backward(dr, cache.r)  # (B, H)
    dxh_r, dw_r, db_r = linear_backward(dr_pre, cache.r_linear)  # (B, E+H), (E+H, H), (H,)
    # In the forward pass this was: xh = torch.cat([x, h_prev], 1), read by r and by z
    dxh = dxh_r + dxh_z  # (B, E+H)
    dx_xh, dh_prev_xh = dxh.split([E, dxh.shape[1] - E], dim=1)  # (B, E), (B, H) terms 3 and 4 of dh_prev
    dx = dx_xh + dx_hbar  # (B, E)
    dh_prev = dh_prev_direct + dh_prev_reset + dh_prev_xh  # (B, H)
    return dx, dh_prev, dw_r, db_r, dw_hbar, db_hbar, dw_z, db_z


# ---------------------------------------------------------------------------------------------
# over a sequence: h_t = cell(x[:, t], h_{t-1}) for t = 0..T-1, from a start state h0
#
# As makemore's RNN: h0 is (B, H), or one learned (1, H) start state broadcast over the batch;
# the output is every hidden state, stacked: (B, T, H).
#
# The forward is the step forward at every position, so the states are the step functions' by
# construction. The backward is where the time went: at makemore's sizes (B = 32, E = H = 64) a
# torch call costs microseconds of overhead and little arithmetic, and the step backward is a dozen
# (RNN) to forty (GRU) calls, with the products for dx and the weights. So backpropagation through
# time runs in two parts (_backprop_through_time):
#   1. the recurrence alone, from the last step back: dL/dh_t for every t, in two (RNN) or eight
#      (GRU) calls per step, every factor that does not depend on dL/dh_t taken for all steps at once;
#   2. the step backward, once: given its dL/dh_t, each position (b, t) is a cell on its own, so the
#      B*T of them are one batch of B*T rows, and its Linears' backwards sum dW and db over the rows,
#      which is the sum over the steps. It gives dx, the weights' gradients and each step's dh_prev,
#      from which dL/dh_t and dh0 are assembled as backpropagation through time defines them.
# Measured and not done: hoisting x_t @ W[:E] (+ b) out of the forward's loop as one (B*T, E) product
# saves about a quarter of the RNN's forward at T = 16 and nothing measurable on the GRU's, but it
# splits each Linear's sum in two, so the states would no longer be the step functions' bit for bit
# (tests/test_sequence_ops.py holds them to it, at T = 1 too); addmm for xh @ W + b does not round
# as the two calls at every shape either (B = 1).


class RNNCache(NamedTuple):
    steps: tuple[RNNStepCache, ...]  # one per position, t = 0..T-1
    h0_shape: torch.Size  # (B, H) or (1, H), to give dh0 h0's shape
    states: tuple[Tensor, ...]  # h_t for t = 0..T-1, each (B, H), the very tensors step t+1 read


class GRUCache(NamedTuple):
    steps: tuple[GRUStepCache, ...]  # one per position, t = 0..T-1
    h0_shape: torch.Size  # (B, H) or (1, H)
    states: tuple[Tensor, ...]  # h_t for t = 0..T-1, each (B, H)


def rnn_forward(x: Tensor, h0: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, RNNCache]:
    """x (B, T, E), h0 (B, H) or (1, H), w (E+H, H), b (H,) -> the hidden states (B, T, H)."""
    out, steps, states = _unroll(rnn_step_forward, x, h0, (w, b))  # (B, T, H)
    return out, RNNCache(steps, h0.shape, states)


def rnn_backward(dout: Tensor, cache: RNNCache) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dh0, dW, db, in the forward's input order, then dh (B, T, H): dL/dh_t at every step.

    In the forward pass this was: for t in range(T): h_t = tanh([x_t, h_{t-1}] @ W + b); out[:, t] = h_t.
    Backpropagation through time in two parts (see _backprop_through_time):

    1. the recurrence: h_t feeds out[:, t] and step t+1, which reads it through W's rows E:, so

           dL/dh_{t-1} = dout[:, t-1] + dpre_t @ W[E:].T,   dpre_t = (1 - h_t**2) * dL/dh_t

       from dL/dh_{T-1} = dout[:, T-1] (nothing comes after the last step): two calls per step;
    2. rnn_step_backward, once over all B*T positions: dx, each step's dh_prev, dW, db.
    """
    batch, T, H = dout.shape
    w = cache.steps[0].linear.w  # (E+H, H)
    E = w.shape[0] - H
    out = torch.stack(cache.states, dim=1)  # (B, T, H)
    # 1. In the forward pass this was: h_t = tanh(xh_t @ W + b), h_t read by out[:, t] and by step t+1.
    # 1 - h*h as one fused multiply-add: in float32 bit for bit ops.one_minus_square (as
    # training/fused.py) without its float64 round trip; part 2's tanh_backward gives the gradients.
    dtanh = torch.addcmul(out.new_ones(()), out, out, value=-1)  # (B, T, H) 1 - h_t**2
    w_h_T = w[E:].T  # (H, H) the rows of W that read h_{t-1}, transposed
    douts, dtanhs = dout.unbind(1), dtanh.unbind(1)  # T of (B, H) each
    dhs = [None] * T
    dh = douts[T - 1]  # (B, H) dL/dh_{T-1}: nothing comes after the last step, only its output
    for t in reversed(range(T)):
        dhs[t] = dh
        if t > 0:
            dh = torch.addmm(douts[t - 1], dtanhs[t] * dh, w_h_T)  # (B, H) dL/dh_{t-1}
    # 2. In the forward pass this was: h_t, step_t = rnn_step_forward(x_t, h_{t-1}, W, b) at every t
    rows = batch * T  # row b*T + t is position (b, t)
    xh = torch.stack([step.linear.x for step in cache.steps], dim=1)  # (B, T, E+H) each step's [x_t, h_{t-1}]
    steps = RNNStepCache(LinearCache(xh.view(rows, E + H), w, True), TanhCache(out.view(rows, H)), E)
    dx, dh_prev, dw, db = rnn_step_backward(torch.stack(dhs, dim=1).view(rows, H), steps)  # (B*T, E), (B*T, H), ...
    dh, dh0 = _backprop_through_time(dout, dh_prev.view(batch, T, H), cache.h0_shape)  # (B, T, H), dh0
    return dx.view(batch, T, E), dh0, dw, db, dh


def gru_forward(
    x: Tensor, h0: Tensor, w_r: Tensor, b_r: Tensor, w_hbar: Tensor, b_hbar: Tensor, w_z: Tensor, b_z: Tensor
) -> tuple[Tensor, GRUCache]:
    """x (B, T, E), h0 (B, H) or (1, H), every w (E+H, H), every b (H,) -> the hidden states (B, T, H)."""
    out, steps, states = _unroll(gru_step_forward, x, h0, (w_r, b_r, w_hbar, b_hbar, w_z, b_z))  # (B, T, H)
    return out, GRUCache(steps, h0.shape, states)


def gru_backward(dout: Tensor, cache: GRUCache) -> tuple[Tensor, ...]:
    """Returns dx, dh0, dW_r, db_r, dW_hbar, db_hbar, dW_z, db_z, in the forward's input order, then
    dh (B, T, H): dL/dh_t at every step.

    In the forward pass this was: for t in range(T): h_t = gru_step(x_t, h_{t-1}, ...); out[:, t] = h_t.
    Backpropagation through time in two parts, as rnn_backward's (see _backprop_through_time):

    1. the recurrence: dL/dh_{t-1} = dout[:, t-1] + the four terms of gru_step_backward's dh_prev,
       from dL/dh_{T-1} = dout[:, T-1]: eight calls per step;
    2. gru_step_backward, once over all B*T positions: dx, each step's dh_prev, the weights' gradients.
    """
    batch, T, H = dout.shape
    first = cache.steps[0]
    w_r, w_hbar, w_z = first.r_linear.w, first.hbar_linear.w, first.z_linear.w  # (E+H, H) each
    E = first.input_width

    def every_step(field) -> Tensor:  # the steps' (B, ...) tensors of one field, stacked: (B, T, ...)
        return torch.stack([field(step) for step in cache.steps], dim=1)

    rows = batch * T  # row b*T + t is position (b, t)
    xh = every_step(lambda s: s.r_linear.x).view(rows, E + H)  # (B*T, E+H) [x_t, h_{t-1}], read by r and z
    xhr = every_step(lambda s: s.hbar_linear.x).view(rows, E + H)  # (B*T, E+H) [x_t, r_t * h_{t-1}]
    h_prev = xh[:, E:].view(batch, T, H)  # (B, T, H) view: h_{t-1} of every step
    r, hbar, z = every_step(lambda s: s.r.out), every_step(lambda s: s.hbar.out), every_step(lambda s: s.z.out)  # (B, T, H) each
    # 1. In the forward pass this was (gru_step_forward):
    #     r = sigmoid(xh @ W_r + b_r); hbar = tanh([x, r * h_prev] @ W_hbar + b_hbar);
    #     z = sigmoid(xh @ W_z + b_z); h = (1 - z) * h_prev + z * hbar
    # so with dh = dL/dh_t, gru_step_backward's terms are
    #     dz_pre = dh * (hbar - h_prev) * (1 - z) * z    dhbar_pre = dh * z * (1 - hbar**2)
    #     dh_reset = dhbar_pre @ W_hbar[E:].T            dr_pre = dh_reset * h_prev * (1 - r) * r
    #     dh_prev = dh * (1 - z) + dh_reset * r + dr_pre @ W_r[E:].T + dz_pre @ W_z[E:].T
    one_minus_z = 1 - z  # (B, T, H)
    to_dz_pre = (hbar - h_prev) * one_minus_z * z  # (B, T, H)
    to_dhbar_pre = z * torch.addcmul(hbar.new_ones(()), hbar, hbar, value=-1)  # (B, T, H) 1 - hbar**2 fused, as rnn_backward's
    to_dr_pre = h_prev * (1 - r) * r  # (B, T, H)
    w_r_h_T, w_hbar_h_T, w_z_h_T = w_r[E:].T, w_hbar[E:].T, w_z[E:].T  # (H, H) each: the rows reading h_{t-1}
    douts = dout.unbind(1)  # T of (B, H)
    per_step = [f.unbind(1) for f in (one_minus_z, r, to_dz_pre, to_dhbar_pre, to_dr_pre)]  # T of (B, H) each
    dhs = [None] * T
    dh = douts[T - 1]  # (B, H) dL/dh_{T-1}: nothing comes after the last step, only its output
    for t in reversed(range(T)):
        dhs[t] = dh
        if t > 0:
            one_minus_z_t, r_t, to_dz_pre_t, to_dhbar_pre_t, to_dr_pre_t = (f[t] for f in per_step)
            dh_reset = (dh * to_dhbar_pre_t) @ w_hbar_h_T  # (B, H)
            carried = torch.addcmul(torch.addcmul(douts[t - 1], dh, one_minus_z_t), dh_reset, r_t)  # (B, H) terms 1, 2
            carried = torch.addmm(carried, dh_reset * to_dr_pre_t, w_r_h_T)  # (B, H) term 3, through r
            dh = torch.addmm(carried, dh * to_dz_pre_t, w_z_h_T)  # (B, H) term 4, through z: dL/dh_{t-1}
    # 2. In the forward pass this was: h_t, step_t = gru_step_forward(x_t, h_{t-1}, ...) at every t
    steps = GRUStepCache(xh[:, E:], LinearCache(xh, w_r, True), SigmoidCache(r.view(rows, H)),
                         LinearCache(xhr, w_hbar, True), TanhCache(hbar.view(rows, H)), LinearCache(xh, w_z, True),
                         SigmoidCache(z.view(rows, H)), E)  # every step's cache, (B*T, ...) rows
    dx, dh_prev, *dweights = gru_step_backward(torch.stack(dhs, dim=1).view(rows, H), steps)  # (B*T, E), (B*T, H), ...
    dh, dh0 = _backprop_through_time(dout, dh_prev.view(batch, T, H), cache.h0_shape)  # (B, T, H), dh0
    return (dx.view(batch, T, E), dh0, *dweights, dh)


def _unroll(step_forward: Callable[..., tuple[Tensor, tuple]], x: Tensor, h0: Tensor,
            weights: tuple[Tensor, ...]) -> tuple[Tensor, tuple, tuple[Tensor, ...]]:
    """Run the cell over the positions of x from h0: the stacked hidden states, one cache per step
    and the states h_t themselves."""
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"a recurrent layer takes a (B, T, E) input with T >= 1, got shape {tuple(x.shape)}")
    batch, T, _ = x.shape
    hidden = weights[0].shape[1]
    if h0.ndim != 2 or h0.shape[0] not in (1, batch) or h0.shape[1] != hidden:
        raise ValueError(f"the start state must be ({batch}, {hidden}) or (1, {hidden}), got shape {tuple(h0.shape)}")
    h = h0.expand(batch, hidden)  # (B, H) a (1, H) start state is broadcast over the batch
    hs, steps = [], []
    for x_t in x.unbind(1):  # (B, E) each
        h, step = step_forward(x_t, h, *weights)  # (B, H)
        hs.append(h)
        steps.append(step)
    return torch.stack(hs, dim=1), tuple(steps), tuple(hs)  # (B, T, H)


def _backprop_through_time(dout: Tensor, dh_prev: Tensor, h0_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """dL/dh_t of every step (B, T, H) and dh0, from the dh_prev (B, T, H) of every step's backward.

    h_t feeds two things, the output out[:, t] and the next step. So the gradient into h_t is the sum

        dL/dh_t = dout[:, t] + dh_prev of step t+1     (nothing comes after the last step)

    and the dh_prev of step 0 is dL/dh0, summed over the batch for a broadcast (1, H) start state.
    Every step used the same weights: their gradients are the sums over the steps, which the step
    backward run over all B*T positions at once has taken (part 2 of rnn_backward, gru_backward).
    Part 1 solved this same recurrence, to give part 2 its dL/dh_t.
    """
    batch = dout.shape[0]
    dh = torch.cat([dout[:, :-1] + dh_prev[:, 1:], dout[:, -1:]], dim=1)  # (B, T, H)
    dh_start = dh_prev[:, 0]  # (B, H) what step 0 passed back to h0
    dh0 = dh_start if h0_shape[0] == batch else dh_start.sum(0, keepdim=True)  # (B, H) or (1, H): broadcast
    return dh, dh0
