"""makemore's RNN and GRU over a whole sequence in C (ops/sequence_kernels.c), with ops.recurrent as fallback.

The forward over every position and the backward through time are one C call each, through
ctypes on the tensors' own storage: the maths of ops.recurrent term for term (the C file quotes its
lines) in float32, where the readable ops dispatch a dozen (rnn) to forty (gru) torch calls per
step, each microseconds of overhead around a product of 32 rows by 64 columns. docs/speed.md has
the figures.

Each function falls back to ops.recurrent unless the library was built (an optional extension,
setup.py) and every tensor is a contiguous float32 CPU tensor outside autograd: float64 (the
checks, so `check --model` proves the readable ops), CUDA and the autograd reference passes run
the readable ops, as before. The backward follows its forward: a native cache goes to C, a
readable one to ops.recurrent. tests/test_native_recurrent.py holds the C path to the readable
ops through the verdict.

    out, cache = rnn_forward(x, h0, w, b)                        # (B, T, H)
    dx, dh0, dw, db, dh = rnn_backward(dout, cache)
    out, cache = gru_forward(x, h0, w_r, b_r, w_hbar, b_hbar, w_z, b_z)
    dx, dh0, dw_r, db_r, dw_hbar, db_hbar, dw_z, db_z, dh = gru_backward(dout, cache)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.native import computes_natively, open_library, set_signatures
from backprop_ninja.ops import recurrent

LIBRARY_STEM = "_sequence_kernels"  # setup.py builds backprop_ninja/ops/_sequence_kernels<suffix>
ABI = 2  # sequence_kernels_abi(): a library built for other arguments is not loaded

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built kernels, or None when the install could not compile them (or they are stale)."""
    lib = open_library(Path(__file__).resolve().parent, LIBRARY_STEM, "sequence_kernels_abi", ABI)
    return None if lib is None else declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The functions' argument and result types, set on the library (or on a test's own build of it):
    the cells', and AdamW's update (optim/native_adamw.py)."""
    sizes = [_i64] * 4  # B, T, E, H
    signatures = {
        "rnn_forward_work_floats": (sizes, _i64),
        "rnn_backward_work_floats": (sizes, _i64),
        "gru_forward_work_floats": (sizes, _i64),
        "gru_backward_work_floats": (sizes, _i64),
        "rnn_forward": ([*sizes, _i64] + [_ptr] * 6, None),
        "rnn_backward": ([*sizes, _i64] + [_ptr] * 11, None),
        "gru_forward": ([*sizes, _i64] + [_ptr] * 12, None),
        "gru_backward": ([*sizes, _i64] + [_ptr] * 19, None),
        "adamw_update": ([_i64] + [_ptr] * 5 + [ctypes.c_double] * 5 + [_i64], None),
    }
    return set_signatures(lib, signatures)


def native_available() -> bool:
    """Whether the install built the C kernels."""
    return load_library() is not None


def _library_for(x: Tensor, h0: Tensor, weights: tuple[Tensor, ...]) -> ctypes.CDLL | None:
    """The library, when it is built, every tensor is one it computes (contiguous float32 on the CPU,
    no autograd to record: the reference passes differentiate the readable ops) and the shapes are
    the op's; otherwise None, and the readable op runs (and raises its own errors)."""
    lib = load_library()
    if lib is None or not computes_natively((x, h0, *weights)):
        return None
    if x.ndim != 3 or min(x.shape) < 1 or h0.ndim != 2:
        return None
    batch, _, E = x.shape
    H = h0.shape[1]
    if H < 1 or h0.shape[0] not in (1, batch):
        return None
    for w, b in zip(weights[::2], weights[1::2]):
        if w.shape != (E + H, H) or b.shape != (H,):
            return None
    return lib


def _work(lib: ctypes.CDLL, kind: str, x: Tensor, H: int) -> Tensor:
    """The C function's scratch floats, from torch's allocator (reused from step to step). Held in a
    name until the call returns: a temporary's storage would be freed once its data_ptr() is read."""
    return x.new_empty(getattr(lib, f"{kind}_work_floats")(*x.shape, H))


# ---------------------------------------------------------------------------------------------
# RNN: h_t = tanh([x_t, h_{t-1}] @ W + b)


class NativeRNNCache(NamedTuple):
    x: Tensor  # (B, T, E) the inputs
    h0: Tensor  # (B, H) or (1, H) the start state
    w: Tensor  # (E+H, H)
    out: Tensor  # (B, T, H) h_t of every step: the states, and tanh's outputs

    @property
    def states(self) -> tuple[Tensor, ...]:
        """h_t for t = 0..T-1, each (B, H), as RNNCache.states."""
        return self.out.unbind(1)


def rnn_forward(x: Tensor, h0: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, NativeRNNCache | recurrent.RNNCache]:
    """ops.recurrent.rnn_forward: x (B, T, E), h0 (B, H) or (1, H), w (E+H, H), b (H,) -> (B, T, H)."""
    lib = _library_for(x, h0, (w, b))
    if lib is None:
        return recurrent.rnn_forward(x, h0, w, b)
    batch, T, E = x.shape
    H = w.shape[1]
    out = x.new_empty(batch, T, H)  # (B, T, H)
    work = _work(lib, "rnn_forward", x, H)
    lib.rnn_forward(batch, T, E, H, h0.shape[0], x.data_ptr(), h0.data_ptr(), w.data_ptr(), b.data_ptr(),
                    out.data_ptr(), work.data_ptr())
    return out, NativeRNNCache(x, h0, w, out)


def rnn_backward(dout: Tensor, cache: NativeRNNCache | recurrent.RNNCache) -> tuple[Tensor, ...]:
    """ops.recurrent.rnn_backward: dx, dh0, dW, db, then dh (B, T, H), dL/dh_t of every step."""
    if not isinstance(cache, NativeRNNCache):
        return recurrent.rnn_backward(dout, cache)
    lib = load_library()
    x, h0, w, out = cache
    dout = _like(dout, out)
    batch, T, E = x.shape
    H = w.shape[1]
    dx, dh = torch.empty_like(x), torch.empty_like(out)  # (B, T, E), (B, T, H)
    dh0, dw, db = torch.empty_like(h0), torch.empty_like(w), w.new_empty(H)  # (1 or B, H), (E+H, H), (H,)
    work = _work(lib, "rnn_backward", x, H)
    lib.rnn_backward(batch, T, E, H, h0.shape[0], x.data_ptr(), h0.data_ptr(), w.data_ptr(), out.data_ptr(),
                     dout.data_ptr(), dx.data_ptr(), dh0.data_ptr(), dw.data_ptr(), db.data_ptr(), dh.data_ptr(),
                     work.data_ptr())
    return dx, dh0, dw, db, dh


# ---------------------------------------------------------------------------------------------
# GRU: r, z gates and a candidate hbar from xh = [x_t, h_{t-1}]; h_t = (1 - z) * h_{t-1} + z * hbar


class NativeGRUCache(NamedTuple):
    x: Tensor  # (B, T, E) the inputs
    h0: Tensor  # (B, H) or (1, H)
    weights: tuple[Tensor, Tensor, Tensor]  # W_r, W_hbar, W_z, (E+H, H) each
    out: Tensor  # (B, T, H) h_t of every step
    gates: Tensor  # (B, T, 3H) [r | z | hbar] of every position: the sigmoids' and the tanh's outputs
    reset: Tensor  # (B, T, H) r * h_{t-1}: the h part of the candidate's input xhr

    @property
    def states(self) -> tuple[Tensor, ...]:
        """h_t for t = 0..T-1, each (B, H), as GRUCache.states."""
        return self.out.unbind(1)


def gru_forward(x: Tensor, h0: Tensor, w_r: Tensor, b_r: Tensor, w_hbar: Tensor, b_hbar: Tensor, w_z: Tensor,
                b_z: Tensor) -> tuple[Tensor, NativeGRUCache | recurrent.GRUCache]:
    """ops.recurrent.gru_forward: x (B, T, E), h0 (B, H) or (1, H), every w (E+H, H), every b (H,) -> (B, T, H)."""
    weights = (w_r, b_r, w_hbar, b_hbar, w_z, b_z)
    lib = _library_for(x, h0, weights)
    if lib is None:
        return recurrent.gru_forward(x, h0, *weights)
    batch, T, E = x.shape
    H = w_r.shape[1]
    out = x.new_empty(batch, T, H)  # (B, T, H)
    gates, reset = x.new_empty(batch, T, 3 * H), x.new_empty(batch, T, H)  # (B, T, 3H), (B, T, H)
    work = _work(lib, "gru_forward", x, H)
    lib.gru_forward(batch, T, E, H, h0.shape[0], x.data_ptr(), h0.data_ptr(), *(t.data_ptr() for t in weights),
                    out.data_ptr(), gates.data_ptr(), reset.data_ptr(), work.data_ptr())
    return out, NativeGRUCache(x, h0, (w_r, w_hbar, w_z), out, gates, reset)


def gru_backward(dout: Tensor, cache: NativeGRUCache | recurrent.GRUCache) -> tuple[Tensor, ...]:
    """ops.recurrent.gru_backward: dx, dh0, dW_r, db_r, dW_hbar, db_hbar, dW_z, db_z, then dh (B, T, H)."""
    if not isinstance(cache, NativeGRUCache):
        return recurrent.gru_backward(dout, cache)
    lib = load_library()
    x, h0, (w_r, w_hbar, w_z), out, gates, reset = cache
    dout = _like(dout, out)
    batch, T, E = x.shape
    H = w_r.shape[1]
    dx, dh, dh0 = torch.empty_like(x), torch.empty_like(out), torch.empty_like(h0)  # (B, T, E), (B, T, H), h0's
    dw = [torch.empty_like(w) for w in (w_r, w_hbar, w_z)]  # (E+H, H) each
    db = [w_r.new_empty(H) for _ in range(3)]  # (H,) each
    work = _work(lib, "gru_backward", x, H)
    lib.gru_backward(batch, T, E, H, h0.shape[0], x.data_ptr(), h0.data_ptr(), w_r.data_ptr(), w_hbar.data_ptr(),
                     w_z.data_ptr(), out.data_ptr(), gates.data_ptr(), reset.data_ptr(), dout.data_ptr(),
                     dx.data_ptr(), dh0.data_ptr(), dw[0].data_ptr(), db[0].data_ptr(), dw[1].data_ptr(),
                     db[1].data_ptr(), dw[2].data_ptr(), db[2].data_ptr(), dh.data_ptr(), work.data_ptr())
    return dx, dh0, dw[0], db[0], dw[1], db[1], dw[2], db[2], dh


def _like(dout: Tensor, out: Tensor) -> Tensor:
    """dout as the C backward reads it: contiguous float32 of the output's shape."""
    if dout.shape != out.shape or dout.dtype != out.dtype or dout.device != out.device:
        raise ValueError(f"the gradient of a recurrent layer's output must be {out.dtype} {tuple(out.shape)}, "
                         f"got {dout.dtype} {tuple(dout.shape)}")
    return dout.contiguous()
