"""The package's optional C libraries (setup.py builds them), loaded with ctypes.

Each is an optional extension: where the install found no C compiler it is absent, and its
callers use torch instead. A library carries an ABI number, so that one built from an older
layout of its structures is not loaded (`pip install -e .`, or `make`, rebuilds it). The helpers
below are the ctypes side every caller shares: declaring the functions, a tensor's storage as a
`float *`, and which tensors the C code may take.

    lib = open_library(Path(__file__).resolve().parent, "_stack_step", "stack_step_abi", ABI)
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch
from torch import Tensor


def open_library(directory: Path, stem: str, abi_function: str, abi: int) -> ctypes.CDLL | None:
    """The extension `stem` that setup.py built in `directory`, or None: not built (no compiler),
    or stale (its `abi_function()` does not return `abi`)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            break
    else:
        return None
    lib = ctypes.CDLL(str(path))
    getattr(lib, abi_function).restype = ctypes.c_int
    return lib if getattr(lib, abi_function)() == abi else None


FLOAT_P = ctypes.POINTER(ctypes.c_float)


def set_signatures(lib: ctypes.CDLL, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """Set each function's argument and result types, `{name: (argtypes, restype)}`, on `lib`."""
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def float_address(t: Tensor | None):
    """A float32 tensor's storage as a C `float *` (NULL for None), for a plan's fields."""
    return ctypes.cast(t.data_ptr(), FLOAT_P) if t is not None else None


def is_cpu_float32(t: Tensor) -> bool:
    """Whether the C code can read and write `t` in place: contiguous float32 on the CPU (dtypes are
    singletons, and t.is_cpu makes no torch.device, so this runs tens of times a step cheaply)."""
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


def computes_natively(tensors) -> bool:
    """Whether an op's C code may take these tensors: each is contiguous float32 on the CPU, and
    none has autograd to record (the reference passes differentiate the readable ops instead)."""
    grad = torch.is_grad_enabled()
    return all(is_cpu_float32(t) and not (grad and t.requires_grad) for t in tensors)
