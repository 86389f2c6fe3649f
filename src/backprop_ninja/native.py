"""The package's optional C libraries (setup.py builds them), loaded with ctypes.

Each is an optional extension: where the install found no C compiler it is absent, and its
callers use torch instead. A library carries an ABI number, so that one built from an older
layout of its structures is not loaded (`pip install -e .`, or `make`, rebuilds it).

    lib = open_library(Path(__file__).resolve().parent, "_stack_step", "stack_step_abi", ABI)
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path


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

