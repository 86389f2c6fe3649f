"""The transformer's ops in C (ops/transformer_kernels.c), with the torch forms as fallback.

Its Linears, GELU, LayerNorm, the heads of causal self-attention and the loss, each forward and
its hand-written backward one C function (and dropout's forward, its masks drawn in the same
pass), called through ctypes on the tensors' own storage: the maths of ops.gelu, ops.layernorm,
ops.attention, ops.dropout and ops.sequence_loss term for term, and ops.linear's products (the C
file quotes their lines), in float32, where the torch forms (ops.fused_transformer) dispatch an
op, and make a tensor, per line. The
attention reads q, k, v straight from the qkv Linear's (B, T, 3E) output and writes y as (B, T, E)
and the gradient as (B, T, 3E): the split and merge copies go too. docs/speed.md has the figures.

Each function falls back to the torch form unless the library was built (an optional extension,
setup.py) for a CPU that runs its vector code (x86-64 with AVX2 and FMA) and every tensor is a
contiguous float32 CPU tensor outside autograd: float64 (the checks), CUDA and the autograd
reference passes run on torch, as before. The caches are the ops' own (LayerNormCache, GELUCache),
so either backward reads either forward's; the attention's is HeadsCache on the C path,
fused_transformer.AttentionCache on torch's. tests/test_native_transformer.py holds each kernel to
the readable op through the verdict.

    out, cache = linear_forward(x, w, b)              # (..., F) -> (..., H)
    dx, dw, db = linear_backward(dout, cache)
    out, cache = layernorm_forward(x, weight, bias)   # (..., E)
    dx, dweight, dbias = layernorm_backward(dout, cache)
    out, cache = gelu_forward(x)                      # (..., H)
    dx = gelu_backward(dout, cache)
    y, cache = heads_forward(qkv, n_head)             # (B, T, 3E) -> (B, T, E)
    dqkv = heads_backward(dy, cache)                  # (B, T, E) -> (B, T, 3E)
    y, cache = heads_forward(rows, n_head, packing=p) # a packed batch (ops.packing): (R, 3E) -> (R, E)
    out, cache = dropout_forward(x, key, p)           # (..., H); ops.dropout_backward(dout, cache)
    loss, cache = sequence_cross_entropy_forward(logits, targets)   # (B, T, V), (B, T) -> ()
    dlogits = sequence_cross_entropy_backward(cache)
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja import ops  # ops.layernorm_backward looked up at each call: the check tests replace it
from backprop_ninja.native import computes_natively, open_library, set_signatures
from backprop_ninja.ops import dropout, fused_transformer
from backprop_ninja.ops.attention import CausalAttentionCache, MergeHeadsCache
from backprop_ninja.ops.dropout import DropoutCache
from backprop_ninja.ops.fused_transformer import AttentionCache
from backprop_ninja.ops.gelu import GELU_BETA, GELU_KAPPA, GELUCache
from backprop_ninja.ops.layernorm import LAYERNORM_EPS, LayerNormCache
from backprop_ninja.ops.linear import LinearCache
from backprop_ninja.ops.packing import (
    PackCache, Packing, UnpackCache, pack_backward, pack_forward, unpack_backward, unpack_forward,
)
from backprop_ninja.ops.sequence_loss import SequenceCrossEntropyCache

LIBRARY_STEM = "_transformer_kernels"  # setup.py builds backprop_ninja/ops/_transformer_kernels<suffix>
ABI = 5  # transformer_kernels_abi(): a library built for other arguments (or without the loss) is not loaded

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built kernels, or None: the install could not compile them (or they are stale), or this
    CPU would run their portable copy, which is slower than torch (x86-64 without AVX2 and FMA, and
    every other architecture, where they were never measured)."""
    lib = open_library(Path(__file__).resolve().parent, LIBRARY_STEM, "transformer_kernels_abi", ABI)
    if lib is None:
        return None
    lib.transformer_kernels_are_vectorized.restype = ctypes.c_int
    if not lib.transformer_kernels_are_vectorized():
        return None
    signatures = {
        "linear_forward": ([_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr], None),
        "linear_backward": ([_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr], ctypes.c_int),
        "gelu_forward": ([_i64, _ptr, _f32, _f32, _ptr, _ptr], None),
        "gelu_backward": ([_i64, _ptr, _ptr, _ptr, _f32, _f32, _ptr], None),
        "layernorm_forward": ([_i64, _i64, _ptr, _ptr, _ptr, _f32, _ptr, _ptr, _ptr], ctypes.c_int),
        "layernorm_backward": ([_i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr], ctypes.c_int),
        "attention_forward": ([_i64, _i64, _ptr, _i64, _i64, _ptr, _f32, _ptr, _ptr], ctypes.c_int),
        "attention_backward": ([_i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _f32, _ptr], ctypes.c_int),
        "dropout_forward": ([_i64, _ptr, ctypes.c_uint64, ctypes.c_uint64, _f32, _ptr, _ptr], None),
        "cross_entropy_forward": ([_i64, _i64, _ptr, _ptr, ctypes.POINTER(ctypes.c_double), _ptr], _i64),
    }
    return set_signatures(lib, signatures)


def native_available() -> bool:
    """Whether the install built the C kernels and this CPU runs their vector code."""
    return load_library() is not None


def _library_for(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, when it is built and every tensor is one it computes: contiguous float32 on the
    CPU, and no autograd to record (the reference passes differentiate the torch forms)."""
    lib = load_library()
    return lib if lib is not None and computes_natively(tensors) else None


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("the transformer kernels could not allocate their scratch memory")


# ---------------------------------------------------------------------------------------------
# Linear: out = x @ w + b, w (F, H) (ops.linear)


def _products_library(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library for a Linear's products: on one torch thread only. On more, torch's BLAS splits
    a product between them, which this single-threaded code does not (threads.threads_for gives a
    step more threads by its work)."""
    return _library_for(*tensors) if torch.get_num_threads() == 1 else None


def linear_forward(x: Tensor, w: Tensor, b: Tensor | None = None) -> tuple[Tensor, LinearCache]:
    """ops.linear_forward with the C product: out = x @ w + b, (..., F) -> (..., H)."""
    lib = _products_library(x, w, *([b] if b is not None else []))
    F, H = w.shape if w.ndim == 2 else (-1, -1)
    if lib is None or x.ndim < 2 or x.shape[-1] != F or F == 0 or (b is not None and b.shape != (H,)):
        return ops.linear_forward(x, w, b)  # torch's product, or the op's own error
    out = x.new_empty(*x.shape[:-1], H)  # (..., H)
    lib.linear_forward(x.numel() // F, F, H, x.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else None,
                       out.data_ptr())
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout: Tensor, cache: LinearCache) -> tuple[Tensor, Tensor, Tensor | None]:
    """ops.linear_backward with the C products: dx = dout @ w.T, dw = x.T @ dout, db = dout.sum(0)."""
    x, w, has_bias = cache
    lib = _products_library(dout, x, w)
    F, H = w.shape
    if lib is None or dout.shape != (*x.shape[:-1], H):
        return ops.linear_backward(dout, cache)
    dx, dw = torch.empty_like(x), torch.empty_like(w)  # (..., F), (F, H)
    db = w.new_empty(H) if has_bias else None  # (H,)
    _checked(lib.linear_backward(x.numel() // F, F, H, dout.data_ptr(), x.data_ptr(), w.data_ptr(), dx.data_ptr(),
                                 dw.data_ptr(), db.data_ptr() if has_bias else None))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# LayerNorm: out = (x - mean) * rstd * weight + bias over the last dim (ops.layernorm)


def layernorm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float = LAYERNORM_EPS,
                      keep: bool = True) -> tuple[Tensor, LayerNormCache | None]:
    """ops.layernorm_forward in one pass a row: out, and the cache (xhat, rstd) unless keep=False
    (eval mode: no backward to come, so neither is written)."""
    lib = _library_for(x, weight, bias)
    if lib is None:
        out, cache = fused_transformer.fused_layernorm_forward(x, weight, bias, eps)
        return out, cache if keep else None
    E = x.shape[-1]
    if weight.shape != (E,) or bias.shape != (E,):  # the op's own message
        return ops.layernorm_forward(x, weight, bias, eps)
    out = torch.empty_like(x)  # (..., E)
    xhat = torch.empty_like(x) if keep else None  # (..., E)
    rstd = x.new_empty(*x.shape[:-1], 1) if keep else None  # (..., 1)
    _checked(lib.layernorm_forward(x.numel() // max(E, 1), E, x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                   eps, out.data_ptr(), xhat.data_ptr() if keep else None,
                                   rstd.data_ptr() if keep else None))
    return out, LayerNormCache(xhat, rstd, weight) if keep else None


def layernorm_backward(dout: Tensor, cache: LayerNormCache) -> tuple[Tensor, Tensor, Tensor]:
    """ops.layernorm_backward in one pass a row: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dxhat = dout * weight; dweight = sum(dout * xhat), dbias = sum(dout) over the rows."""
    xhat, rstd, weight = cache
    lib = _library_for(dout, xhat, rstd, weight)
    if lib is None:
        return ops.layernorm_backward(dout, cache)  # the torch form's backward is the op itself
    E = weight.shape[0]
    dx = torch.empty_like(dout)  # (..., E)
    dweight, dbias = weight.new_empty(E), weight.new_empty(E)  # (E,), (E,)
    _checked(lib.layernorm_backward(dout.numel() // max(E, 1), E, dout.data_ptr(), xhat.data_ptr(), rstd.data_ptr(),
                                    weight.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr()))
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# dropout: out = x * mask, mask = keep / (1 - p) from counter-based draws (ops.dropout)


def dropout_forward(x: Tensor, key: int, p: float) -> tuple[Tensor, DropoutCache]:
    """ops.dropout_forward in one pass, drawing the same masks: out, and the cache (the mask)."""
    lib = _library_for(x)
    if lib is None:
        return dropout.dropout_forward(x, key, p)
    out, mask = torch.empty_like(x), torch.empty_like(x)  # (..., H) each
    lib.dropout_forward(x.numel(), x.data_ptr(), key, dropout.drop_threshold(p), 1.0 / (1.0 - p), out.data_ptr(),
                        mask.data_ptr())
    return out, DropoutCache(mask)


# ---------------------------------------------------------------------------------------------
# GELU, the tanh approximation: out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) (ops.gelu)


def gelu_forward(x: Tensor, keep: bool = True) -> tuple[Tensor, GELUCache | None]:
    """ops.gelu_forward in one pass: out, and the cache (x, tanh_inner) unless keep=False (eval mode)."""
    lib = _library_for(x)
    if lib is None:
        out, cache = fused_transformer.fused_gelu_forward(x)
        return out, cache if keep else None
    out = torch.empty_like(x)  # (..., H)
    tanh_inner = torch.empty_like(x) if keep else None  # (..., H)
    lib.gelu_forward(x.numel(), x.data_ptr(), GELU_BETA, GELU_KAPPA, out.data_ptr(),
                     tanh_inner.data_ptr() if keep else None)
    return out, GELUCache(x, tanh_inner) if keep else None


def gelu_backward(dout: Tensor, cache: GELUCache) -> Tensor:
    """ops.gelu_backward in one pass: dout * (0.5 * (1 + tanh(inner)) + 0.5 x (1 - tanh(inner)**2) inner'(x))."""
    x, tanh_inner = cache
    lib = _library_for(dout, x, tanh_inner)
    if lib is None or dout.shape != x.shape:
        return fused_transformer.fused_gelu_backward(dout, cache)
    dx = torch.empty_like(dout)  # (..., H)
    lib.gelu_backward(dx.numel(), dout.data_ptr(), x.data_ptr(), tanh_inner.data_ptr(), GELU_BETA, GELU_KAPPA,
                      dx.data_ptr())
    return dx


# ---------------------------------------------------------------------------------------------
# the heads of causal self-attention: qkv (B, T, 3E) -> y (B, T, E), ops.split_heads, then
# ops.causal_attention, then ops.merge_heads


class HeadsCache(NamedTuple):
    """What the C backward reads: the heads' input itself (the qkv Linear's output, which its Branch
    keeps anyway), so no copy of q, k, v."""

    qkv: Tensor  # (B, T, 3E) q, k, v side by side; (R, 3E) the live rows of a packed batch
    att: Tensor | None  # (B, nh, T, T) the attention weights; None with recompute: rebuilt from q, k
    n_head: int
    scale: float  # 1 / sqrt(hs), the scores' scale
    packing: Packing | None = None  # the batch's, when qkv holds its live rows


class UnpackedHeadsCache(NamedTuple):
    """A packed batch's heads run by the torch forms: on its (B, T, 3E) form, rows put back in place."""

    heads: HeadsCache | AttentionCache
    packing: Packing


def attention_scale(hs: int) -> float:
    """makemore's (1.0 / math.sqrt(k.size(-1)))."""
    return 1.0 / math.sqrt(hs)


Heads = HeadsCache | AttentionCache | UnpackedHeadsCache


def heads_forward(qkv: Tensor, n_head: int, recompute: bool = False, keep: bool = True,
                  packing: Packing | None = None) -> tuple[Tensor, Heads | None]:
    """y = merge_heads(softmax(masked(q @ k^T / sqrt(hs))) @ v) for q, k, v = split_heads(qkv), one
    pass per (example, head). The cache keeps att, (B, nh, T, T), unless recompute=True (the backward
    rebuilds it by the same code, so the same floats); no cache with keep=False (eval mode).

    With `packing`, qkv is a packed batch's live rows (R, 3E) and y is (R, E): the C code reads each
    sequence's rows where they are; the torch forms get the (B, T, 3E) form, zeros at the dead
    positions (ops.packing), and give back the live rows of theirs."""
    lib = _library_for(qkv)
    packed = packing is not None
    takes = (lib is not None and qkv.ndim == (2 if packed else 3) and n_head >= 1 and not qkv.shape[-1] % (3 * n_head)
             and (not packed or qkv.shape[0] == packing.index.numel()))
    if not takes and packed:
        y, heads = heads_forward(unpack_forward(qkv, packing)[0], n_head, recompute, keep)  # (B, T, E)
        return pack_forward(y, packing)[0], UnpackedHeadsCache(heads, packing) if keep else None  # (R, E)
    if not takes:
        out, cache = fused_transformer.fused_heads_forward(qkv, n_head, recompute)  # its own errors
        return out, cache if keep else None
    B, T = (packing.batch, packing.positions) if packed else qkv.shape[:2]
    E = qkv.shape[-1] // 3
    hs = E // n_head
    scale = attention_scale(hs)
    y = qkv.new_empty(*qkv.shape[:-1], E)  # (B, T, E) or (R, E)
    att = qkv.new_empty(B, n_head, T, T) if keep and not recompute else None  # (B, nh, T, T)
    _checked(lib.attention_forward(B, T, packing.lengths.data_ptr() if packed else None, n_head, hs,
                                   qkv.data_ptr(), scale, y.data_ptr(), att.data_ptr() if att is not None else None))
    return y, HeadsCache(qkv, att, n_head, scale, packing) if keep else None


def heads_backward(dy: Tensor, cache: Heads) -> Tensor:
    """dqkv (B, T, 3E), or (R, 3E) packed: dq, dk, dv of ops.causal_attention_backward, side by side as
    q, k, v in qkv."""
    if isinstance(cache, UnpackedHeadsCache):
        # In the forward pass this was: y = pack(heads(unpack(qkv)))
        dqkv = heads_backward(pack_backward(dy, PackCache(cache.packing)), cache.heads)  # (B, T, 3E)
        return unpack_backward(dqkv, UnpackCache(cache.packing))  # (R, 3E)
    if isinstance(cache, AttentionCache):
        return fused_transformer.fused_heads_backward(dy, cache)
    qkv, att, n_head, scale, packing = cache
    lib = _library_for(dy, qkv, *([att] if att is not None else []))
    if lib is None:  # a dy the C code does not take (strided, or recorded by autograd): torch's backward
        if packing is None:
            return fused_transformer.fused_heads_backward(dy, torch_heads_cache(cache))
        unpacked = cache._replace(qkv=unpack_forward(qkv, packing)[0], packing=None)  # (B, T, 3E)
        return heads_backward(dy, UnpackedHeadsCache(torch_heads_cache(unpacked), packing))  # (R, 3E)
    B, T = (packing.batch, packing.positions) if packing is not None else qkv.shape[:2]
    dqkv = torch.empty_like(qkv)  # (B, T, 3E) or (R, 3E)
    _checked(lib.attention_backward(B, T, packing.lengths.data_ptr() if packing is not None else None, n_head,
                                    qkv.shape[-1] // (3 * n_head), qkv.data_ptr(),
                                    att.data_ptr() if att is not None else None, dy.data_ptr(), scale,
                                    dqkv.data_ptr()))
    return dqkv


def heads_weights(cache: Heads) -> Tensor:
    """att (B, nh, T, T) of the forward pass that made `cache` (rebuilt from q, k when it was not kept,
    by the code that made the forward's)."""
    if isinstance(cache, UnpackedHeadsCache):
        return heads_weights(cache.heads)
    if isinstance(cache, HeadsCache):
        if cache.att is not None:
            return cache.att
        _, rebuilt = heads_forward(cache.qkv, cache.n_head, packing=cache.packing)  # the same kernel: the same floats
        return rebuilt.att
    attention = cache.attention
    return attention.att if attention.att is not None else fused_transformer.fused_attention_weights(
        attention.q, attention.k)


def torch_heads_cache(cache: HeadsCache) -> AttentionCache:
    """The torch form's cache of the same forward pass: q, k, v split from qkv, att as kept."""
    q, k, v, split = fused_transformer.split_heads_contiguous(cache.qkv, cache.n_head)  # (B, nh, T, hs) each
    return AttentionCache(split, CausalAttentionCache(q, k, v, cache.att), MergeHeadsCache(cache.n_head))


# ---------------------------------------------------------------------------------------------
# sequence cross-entropy: the mean of -log softmax(logits)[Y] over the predicted positions (ops.sequence_loss)


class CrossEntropyGradient(NamedTuple):
    """The C forward's cache: the gradient itself, written in the forward's pass (the loss ends the graph)."""

    dlogits: Tensor  # (B, T, V) (softmax - one_hot(Y)) / n where predicted, 0 where ignored


def sequence_cross_entropy_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, CrossEntropyGradient |
                                                                                    SequenceCrossEntropyCache]:
    """ops.sequence_cross_entropy_forward in one pass a row, which writes the backward's dlogits too:
    the loss () and the cache. A batch the op refuses (no prediction, a target out of range) gets
    the op's own error."""
    lib = _library_for(logits)
    if (lib is None or logits.ndim != 3 or targets.shape != logits.shape[:2] or targets.dtype is not torch.int64
            or not targets.is_cpu or not targets.is_contiguous()):
        return ops.sequence_cross_entropy_forward(logits, targets)
    dlogits = torch.empty_like(logits)  # (B, T, V)
    loss = ctypes.c_double()
    V = logits.shape[-1]
    if lib.cross_entropy_forward(logits.numel() // max(V, 1), V, logits.data_ptr(), targets.data_ptr(),
                                 ctypes.byref(loss), dlogits.data_ptr()) <= 0:
        return ops.sequence_cross_entropy_forward(logits, targets)  # its message (or, out of memory, its loss)
    return torch.tensor(loss.value, dtype=logits.dtype), CrossEntropyGradient(dlogits)


def sequence_cross_entropy_backward(cache: CrossEntropyGradient | SequenceCrossEntropyCache) -> Tensor:
    """dlogits (B, T, V). In the forward pass this was: loss = F.cross_entropy(logits, Y, ignore_index=-1)."""
    if isinstance(cache, CrossEntropyGradient):
        return cache.dlogits
    return ops.sequence_cross_entropy_backward(cache)
