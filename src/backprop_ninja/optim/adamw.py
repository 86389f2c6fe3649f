"""AdamW (Loshchilov and Hutter, 2019), written out as torch.optim.AdamW computes it.

Per parameter p with gradient g, at step t = 1, 2, ...:

    p *= 1 - lr * weight_decay                       # decoupled weight decay
    m = beta1 * m + (1 - beta1) * g                  # first moment
    v = beta2 * v + (1 - beta2) * g * g              # second moment
    p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

makemore's settings are the defaults: lr 5e-4 (given per step), weight decay 0.01, betas
(0.9, 0.99), eps 1e-8. The moments and the step count are the state a checkpoint keeps, so a
resumed run continues bit for bit (makemore's own --resume restores the model only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from backprop_ninja.optim.native_adamw import adamw_update

STEP_KEY = "step"  # (1,) int64 in the state: steps taken


class AdamW:
    name = "adamw"

    def __init__(self, params: dict[str, Tensor], weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8) -> None:
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = {name: torch.zeros_like(p) for name, p in params.items()}  # first moments
        self.v = {name: torch.zeros_like(p) for name, p in params.items()}  # second moments
        self.t = 0

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float) -> None:
        """The update of the module's docstring, on every parameter at once: each line is one
        torch._foreach_* call over the lists (as torch.optim's foreach AdamW), the same arithmetic
        per tensor, bit for bit, at a fifth of the calls (docs/speed.md). Where every tensor is
        contiguous float32 on the CPU, one C call does these lines, rounding where they round
        (ops/sequence_kernels.c's adamw_update): the same moments bit for bit, parameters to an
        ulp (its square root is correctly rounded, torch's AVX-512 one not always)."""
        self.t += 1
        beta1, beta2 = self.betas
        p, g = list(params.values()), [grads[name] for name in params]
        m, v = [self.m[name] for name in params], [self.v[name] for name in params]
        if adamw_update(p, m, v, g, lr, self.weight_decay, beta1, beta2, self.eps, self.t):
            return
        bias1 = 1 - beta1**self.t
        root_bias2 = math.sqrt(1 - beta2**self.t)
        torch._foreach_mul_(p, 1 - lr * self.weight_decay)  # p *= 1 - lr * weight_decay
        torch._foreach_lerp_(m, g, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g
        torch._foreach_mul_(v, beta2)  # v = beta2 * v + (1 - beta2) * g * g
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denominator = torch._foreach_sqrt(v)  # sqrt(v) / sqrt(1 - beta2**t) + eps
        torch._foreach_div_(denominator, root_bias2)
        torch._foreach_add_(denominator, self.eps)
        torch._foreach_addcdiv_(p, m, denominator, value=-lr / bias1)  # p -= lr / (1 - beta1**t) * m / denominator

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"m.{name}": m for name, m in self.m.items()}
        state |= {f"v.{name}": v for name, v in self.v.items()}
        state[STEP_KEY] = torch.tensor([self.t], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {f"m.{n}" for n in self.m} | {f"v.{n}" for n in self.v} | {STEP_KEY}
        if state.keys() != expected:
            missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
            raise ValueError(f"AdamW state: missing {missing}, unexpected {extra}")
        for name in self.m:
            for moments, prefix in ((self.m, "m."), (self.v, "v.")):
                stored = state[prefix + name]
                if stored.shape != moments[name].shape or stored.dtype != moments[name].dtype:
                    raise ValueError(f"AdamW state: {prefix}{name} is {stored.dtype} {tuple(stored.shape)}")
                moments[name].copy_(stored)
        self.t = int(state[STEP_KEY][0])
