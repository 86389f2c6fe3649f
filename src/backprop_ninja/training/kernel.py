"""The lecture MLP's training step in C (mlp_step.c), called through ctypes.

At the lecture's batch of 32 a step is ~2.3 MFLOP. `fused.FastMLPStepper` makes it ~40 torch calls,
and those calls cost more than their arithmetic. mlp_step.c makes it one call into plain loops:
matrix products blocked so their partial sums stay in registers, tanh and exp in float64, and the
update in place on the model's own parameter storage. It computes what the torch step computes and
agrees with it to float32 rounding (tests/test_fast.py names the tolerances).

The library is built with the package (setup.py). It is an optional extension: without a C
compiler the install succeeds, and `train` uses the torch step instead. `train` also leaves the
step to torch on CPUs without AVX2 and FMA, where the C step's portable code is slow
(`kernel_is_fast()`).

    stepper = make_kernel_stepper(model, batch_size)  # None when the library or the model does not fit
    loss = stepper.step(Xb, Yb, lr)                   # forward, backward and SGD update, in place
    losses = stepper.steps(Xs, Ys, lrs)               # many steps in one call: (S, B, T), (S, B), S floats
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from backprop_ninja.models import Model, is_lecture_mlp
from backprop_ninja.native import FLOAT_P, float_address, open_library, set_signatures
from backprop_ninja.training.c_stepper import CStepper, holds_cpu_float32

LIBRARY_STEM = "_mlp_step"  # setup.py builds backprop_ninja/_mlp_step<extension suffix>
ABI = 1  # mlp_step_abi(): a library built from another layout of `MLP` is not loaded


class MLPPlan(ctypes.Structure):
    """mlp_step.c's `MLP`: the model's shape and the addresses of its parameters and buffers."""

    _fields_ = [
        ("T", ctypes.c_int64), ("E", ctypes.c_int64), ("H", ctypes.c_int64), ("V", ctypes.c_int64),
        ("C", FLOAT_P), ("W1", FLOAT_P), ("b1", FLOAT_P), ("gain", FLOAT_P), ("bias", FLOAT_P),
        ("running_mean", FLOAT_P), ("running_var", FLOAT_P), ("W2", FLOAT_P), ("b2", FLOAT_P),
        ("momentum", ctypes.c_float), ("eps", ctypes.c_float),
    ]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built step library, or None when the install could not compile it."""
    lib = open_library(Path(__file__).resolve().parent, LIBRARY_STEM, "mlp_step_abi", ABI)
    if lib is None:
        return None
    plan_p = ctypes.POINTER(MLPPlan)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return set_signatures(lib, {
        "mlp_workspace_floats": ([plan_p, i64], i64),
        "mlp_step": ([plan_p, ptr, ptr, i64, ctypes.c_float, ptr], ctypes.c_float),
        "mlp_steps": ([plan_p, ptr, ptr, i64, i64, ptr, ptr, ptr], None),
        "mlp_tanh": ([i64, ptr, ptr], None),
        "mlp_step_is_vectorized": ([], ctypes.c_int),
    })


def kernel_available() -> bool:
    """Whether the install built the C step."""
    return load_library() is not None


def kernel_is_fast() -> bool:
    """Whether the C step runs its AVX2 code here (x86-64 with AVX2 and FMA): where `train` uses it."""
    lib = load_library()
    return lib is not None and bool(lib.mlp_step_is_vectorized())


def make_kernel_stepper(model: Model, batch_size: int) -> "KernelMLPStepper | None":
    """The C stepper for `model`, or None: no library, not the lecture MLP, or not float32 on the CPU."""
    if load_library() is None or not is_lecture_mlp(model) or not holds_cpu_float32(model):
        return None
    return KernelMLPStepper(model, batch_size)


def mlp_tanh(x: Tensor) -> Tensor:
    """tanh as the C step computes it (float32, CPU): for tests."""
    lib = load_library()
    if lib is None:
        raise RuntimeError("the C step library is not built")
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.mlp_tanh(x.numel(), x.data_ptr(), out.data_ptr())
    return out


class KernelMLPStepper(CStepper):
    """Forward, hand-written backward and SGD update of the lecture MLP, in C, in place on the model.

    The plan holds the addresses of the model's tensors: they must stay the same tensors (every
    part of this package updates parameters and buffers in place).
    """

    name = "c"

    def __init__(self, model: Model, batch_size: int) -> None:
        embedding, _, linear1, batchnorm, _, linear2 = model.net.layers
        self._hold({  # where each tensor of the plan lives in the model: (dict, key)
            "C": (embedding.params, embedding.name),  # (V, E)
            "W1": (linear1.params, linear1.w_name), "b1": (linear1.params, linear1.b_name),  # (T*E, H), (H,)
            "gain": (batchnorm.params, batchnorm.gain_name), "bias": (batchnorm.params, batchnorm.bias_name),  # (1, H)
            "running_mean": (batchnorm.buffers, batchnorm.mean_name),  # (1, H)
            "running_var": (batchnorm.buffers, batchnorm.var_name),  # (1, H)
            "W2": (linear2.params, linear2.w_name), "b2": (linear2.params, linear2.b_name),  # (H, V), (V,)
        })
        addresses = {name: float_address(t) for name, t in self.tensors.items()}
        config = model.config
        self.plan = MLPPlan(T=config.block_size, E=config.n_embd, H=config.n_hidden, V=config.vocab_size,
                            momentum=batchnorm.momentum, eps=batchnorm.eps, **addresses)
        self.plan_ref = ctypes.byref(self.plan)
        self.lib = load_library()
        self._workspace(batch_size)

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One SGD step on the batch (Xb (B, T) int64, Yb (B,) int64); returns the loss (0-d)."""
        self._check_tensors()
        Xb, Yb = self._ids(Xb, Yb, batch_dims=1)
        loss = self.lib.mlp_step(self.plan_ref, Xb.data_ptr(), Yb.data_ptr(), Yb.shape[0], lr, self.work.data_ptr())
        return torch.scalar_tensor(loss)  # float32 0-d; cheaper than torch.tensor(loss)

    def steps(self, Xs: Tensor, Ys: Tensor, lrs: list[float]) -> Tensor:
        """len(lrs) steps in one call, on the batches Xs (S, B, T), Ys (S, B); returns the losses (S,).

        The same as calling `step` on each batch in turn, bit for bit; `train` uses it for the
        chunks of steps on which no per-step check (--verify-every, diagnostics) falls.
        """
        self._check_tensors()
        Xs, Ys = self._ids(Xs, Ys, batch_dims=2)
        if len(lrs) != Ys.shape[0]:
            raise ValueError(f"{len(lrs)} learning rates for {Ys.shape[0]} batches of steps")
        S, B = Ys.shape
        lr = torch.tensor(lrs, dtype=torch.float32)  # (S,)
        losses = torch.empty(S, dtype=torch.float32)  # (S,)
        self.lib.mlp_steps(self.plan_ref, Xs.data_ptr(), Ys.data_ptr(), S, B, lr.data_ptr(), losses.data_ptr(),
                           self.work.data_ptr())
        return losses

    def _workspace_floats(self, batch_size: int) -> int:
        return self.lib.mlp_workspace_floats(self.plan_ref, batch_size)

    def _ids(self, X: Tensor, Y: Tensor, batch_dims: int) -> tuple[Tensor, Tensor]:
        """X and Y as the C step reads them (contiguous int64), with a workspace for their batch size:
        Y (B,) for a step, (S, B) for a chunk of steps (the batch size the workspace is made for)."""
        if X.dtype != torch.int64 or Y.dtype != torch.int64:
            raise TypeError(f"the C step takes int64 ids, not {X.dtype} and {Y.dtype}")
        if Y.ndim != batch_dims or Y.shape[-1] < 1 or X.shape != (*Y.shape, self.plan.T):
            raise ValueError(f"contexts {tuple(X.shape)} do not fit targets {tuple(Y.shape)} "
                             f"and block size {self.plan.T}")
        self._workspace(Y.shape[-1])
        return X.contiguous(), Y.contiguous()  # no copy for the slices train passes
