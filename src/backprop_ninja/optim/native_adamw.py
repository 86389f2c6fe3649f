"""optim.AdamW's update in one C call: ops/sequence_kernels.c's adamw_update, the code of the
sequence models' C step, on every parameter of any model whose tensors it can take."""

from __future__ import annotations

import ctypes

from torch import Tensor

from backprop_ninja.native import computes_natively
from backprop_ninja.ops.native_recurrent import load_library

_i64 = ctypes.c_int64


def adamw_update(params: list[Tensor], m: list[Tensor], v: list[Tensor], grads: list[Tensor], lr: float,
                 weight_decay: float, beta1: float, beta2: float, eps: float, t: int) -> bool:
    """optim.AdamW's step t on every parameter in one C call (sequence_kernels.c's adamw_update),
    where the library is built and each parameter, its moments and its gradient are contiguous
    float32 CPU tensors of one shape, none recorded by autograd; False, and nothing done, otherwise."""
    lib = load_library()
    if lib is None or len({len(params), len(m), len(v), len(grads)}) != 1:
        return False
    if not computes_natively([*params, *m, *v, *grads]):
        return False
    if any(p.shape != g.shape or p.shape != mp.shape or p.shape != vp.shape
           for p, mp, vp, g in zip(params, m, v, grads)):
        return False
    count = len(params)
    addresses = [(ctypes.c_void_p * count)(*[x.data_ptr() for x in ts]) for ts in (params, m, v, grads)]
    sizes = (_i64 * count)(*[p.numel() for p in params])
    lib.adamw_update(count, *addresses, sizes, lr, weight_decay, beta1, beta2, eps, t)
    return True
