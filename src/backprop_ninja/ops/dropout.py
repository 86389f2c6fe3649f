"""Inverted dropout, with counter-based masks. Conventions: backprop_ninja.conventions.

    keep_i = u_i >= p            u_i uniform in [0, 1) on 24 bits, for entry i of x (row-major)
    mask_i = keep_i / (1 - p)    out = x * mask;  dx = dout * mask

u_i is SplitMix64 (Steele, Lea and Flood, 2014) run from the call's key: the top 24 bits of
mix64(key + (i + 1) * GAMMA). A counter-based draw: entry i's number depends on (key, i) alone, so
the C kernel (ops/transformer_kernels.c's dropout_forward) and the torch form here draw the same
masks on any device, bit for bit, and no generator carries state from one call to the next: a
layer's key comes from its seed and its count of calls (nn.Dropout), which a checkpoint keeps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / the golden ratio, odd
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its finalizer's multipliers (Stafford's mix 13)
UNIFORM_BITS = 24  # a float32 in [0, 1) holds 24 bits: torch.rand's resolution too


def mix64(z: int) -> int:
    """SplitMix64's finalizer on a Python int, mod 2^64."""
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def dropout_key(seed: int, call: int) -> int:
    """The key of a layer's forward call number `call` (0, 1, ...): the masks of one call and the next
    are independent draws."""
    return mix64((seed * 1_000_003 + call) & MASK64)


def drop_threshold(p: float) -> int:
    """keep_i = u_i >= p, as integers: the 24 bits of u_i at least ceil(p * 2^24) (p * 2^24 is exact)."""
    return math.ceil(p * (1 << UNIFORM_BITS))


def _signed(c: int) -> int:
    """The int64 with the bits of c (torch's integers are signed; its arithmetic wraps mod 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, k: int) -> Tensor:
    """z >> k as an unsigned 64-bit shift (torch shifts int64 arithmetically: the sign bit smears)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform_bits(key: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n,) int64: the 24 bits of u_0 .. u_{n-1}, each in [0, 2^24)."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _signed(GAMMA) + _signed(key)  # (n,) mod 2^64
    z = (z ^ _shr(z, 30)) * _signed(MIX1)  # (n,)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)  # (n,)
    return _shr(z ^ _shr(z, 31), 64 - UNIFORM_BITS)  # (n,)


# dropout: out = x * mask


class DropoutCache(NamedTuple):
    mask: Tensor  # (...,) 0 or 1/(1-p), x's dtype


def dropout_forward(x: Tensor, key: int, p: float) -> tuple[Tensor, DropoutCache]:
    keep = uniform_bits(key, x.numel(), x.device).reshape(x.shape) >= drop_threshold(p)  # (...,) bool
    mask = keep.to(x.dtype).mul_(1.0 / (1.0 - p))  # (...,) 0 or 1/(1-p)
    return x * mask, DropoutCache(mask)


def dropout_backward(dout: Tensor, cache: DropoutCache) -> Tensor:
    # In the forward pass this was: out = x * mask
    return dout * cache.mask.to(dout.dtype)  # (...,)
