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

    In the forward pass this was: for t in range(T): h = rnn_step(x[:, t], h, W, b); out[:, t] = h.
    Backpropagation through time: see _backprop_through_time.
    """
    dx, dh0, dweights, dh = _backprop_through_time(dout, cache.steps, rnn_step_backward, cache.h0_shape)
    return (dx, dh0, *dweights, dh)


def gru_forward(
    x: Tensor, h0: Tensor, w_r: Tensor, b_r: Tensor, w_hbar: Tensor, b_hbar: Tensor, w_z: Tensor, b_z: Tensor
) -> tuple[Tensor, GRUCache]:
    """x (B, T, E), h0 (B, H) or (1, H), every w (E+H, H), every b (H,) -> the hidden states (B, T, H)."""
    out, steps, states = _unroll(gru_step_forward, x, h0, (w_r, b_r, w_hbar, b_hbar, w_z, b_z))  # (B, T, H)
    return out, GRUCache(steps, h0.shape, states)


def gru_backward(dout: Tensor, cache: GRUCache) -> tuple[Tensor, ...]:
    """Returns dx, dh0, dW_r, db_r, dW_hbar, db_hbar, dW_z, db_z, in the forward's input order, then
    dh (B, T, H): dL/dh_t at every step.

    In the forward pass this was: for t in range(T): h = gru_step(x[:, t], h, ...); out[:, t] = h.
    Backpropagation through time: see _backprop_through_time.
    """
    dx, dh0, dweights, dh = _backprop_through_time(dout, cache.steps, gru_step_backward, cache.h0_shape)
    return (dx, dh0, *dweights, dh)


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
    for t in range(T):
        h, step = step_forward(x[:, t], h, *weights)  # (B, H)
        hs.append(h)
        steps.append(step)
    return torch.stack(hs, dim=1), tuple(steps), tuple(hs)  # (B, T, H)


def _backprop_through_time(dout: Tensor, steps: tuple, step_backward: Callable[..., tuple[Tensor, ...]],
                           h0_shape: torch.Size) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor]:
    """dx, dh0, the weights' gradients and dL/dh_t of every step (B, T, H), from the last step back.

    h_t feeds two things: the output out[:, t] and the next step. So the gradient into h_t is the sum

        dL/dh_t = dout[:, t] + dh_prev of step t+1     (nothing comes after the last step)

    and the last dh_prev, of step 0, is dL/dh0. Every step used the same weights: their gradients
    are the sums of the steps' (local sums: the result is fresh, nothing outside is accumulated into).
    """
    batch, T, _ = dout.shape
    dxs: list[Tensor] = [None] * T  # type: ignore[list-item]
    dweights: list[Tensor] = []
    dhs = torch.empty_like(dout)  # (B, T, H)
    dh_next = torch.zeros_like(dout[:, 0])  # (B, H) the gradient from after the last step: none
    for t in reversed(range(T)):
        dh = dout[:, t] + dh_next  # (B, H) dL/dh_t: from the output and from step t+1
        dhs[:, t] = dh
        dxs[t], dh_next, *dstep = step_backward(dh, steps[t])  # (B, E), (B, H), the weights'
        dweights = dstep if t == T - 1 else [total + d for total, d in zip(dweights, dstep)]  # (E+H, H), (H,), ...
    dx = torch.stack(dxs, dim=1)  # (B, T, E)
    dh0 = dh_next if h0_shape[0] == batch else dh_next.sum(0, keepdim=True)  # (B, H) or (1, H): broadcast
    return dx, dh0, tuple(dweights), dhs
