"""Deliberately wrong builds of ops/sequence_kernels.c, for the tests that must be able to fail.

Each slip is one textual change of the library's source (sequence_kernels.c or a header it
includes), a bug the C code could have: the library is built from the changed copy with gcc and
declared as the real one is, so a test can put it where ops.native_recurrent and
training.sequence_kernel look for their library. A slip whose text is not in exactly one place of
the sources fails loudly, rather than testing nothing.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import shutil
import subprocess
from pathlib import Path

import pytest

from backprop_ninja.native import open_library
from backprop_ninja.ops import native_recurrent
from backprop_ninja.training import sequence_kernel

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "backprop_ninja"
# the library's sources, by their paths in the package: copied side by side, so that the includes
# ("../training/step_kernels.h", and that header's "../ops/cpu_clones.h") find the copies
SOURCES = ("ops/sequence_kernels.c", "ops/cpu_clones.h", "training/step_kernels.h")
# setup.py's flags but -O1: a slip needs no vectorizing, and -O3 takes most of a minute to build
FLAGS = ["-O1", "-fno-trapping-math", "-Wno-psabi"]

# name -> (the right text, the slipped text)
SLIPS = {
    # the RNN's tanh backward without its 1 - h**2 (the readable ops' slip of test_sequence_twins.py)
    "rnn tanh": ("dpre[at + j] = __builtin_fmaf(-out[at + j], out[at + j], 1.0f) * dh[at + j];",
                 "dpre[at + j] = dh[at + j];"),
    # the GRU's dh_prev without its term through h_reset = r * h_prev
    "gru reset": ("+ d[j] * (1.0f - z) + dres[j] * rj;", "+ d[j] * (1.0f - z);"),
    # the bag of words' causal mean backward without its 1/(q+1)
    "bow mean": ("running[e] += weight * dyq[e];", "running[e] += dyq[e];"),
    # the loss's mean over every position, not the predicted ones: dlogits / B*T
    "loss mean": ("for (int64_t j = 0; j < V; j++) row[j] /= (float)n;", "for (int64_t j = 0; j < V; j++) row[j] /= (float)R;"),
}


_built: dict[str, ctypes.CDLL] = {}  # slip -> its library, built once per test session


def slipped_library(directory: Path, slip: str) -> ctypes.CDLL:
    """The kernels built with `slip` (in `directory`, the first time), declared for both modules;
    skips the test without gcc."""
    if slip in _built:
        return _built[slip]
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc to build a slipped copy of the kernels")
    right, wrong = SLIPS[slip]
    texts = {name: (PACKAGE / name).read_text(encoding="utf-8") for name in SOURCES}
    matches = sum(text.count(right) for text in texts.values())
    assert matches == 1, f"the slip {slip!r} no longer matches its source"
    for name, text in texts.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text.replace(right, wrong), encoding="utf-8")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built = directory / f"{native_recurrent.LIBRARY_STEM}{suffix}"
    subprocess.run([compiler, *FLAGS, "-fPIC", "-shared", str(directory / SOURCES[0]), "-o", str(built), "-lm"],
                   check=True)
    lib = open_library(directory, native_recurrent.LIBRARY_STEM, "sequence_kernels_abi", native_recurrent.ABI)
    assert lib is not None
    _built[slip] = sequence_kernel.declare(native_recurrent.declare(lib))
    return _built[slip]


def use(monkeypatch, lib: ctypes.CDLL | None) -> None:
    """Make `lib` the library both modules load (None: as if it were not built)."""
    monkeypatch.setattr(native_recurrent, "load_library", lambda: lib)
    monkeypatch.setattr(sequence_kernel, "load_library", lambda: lib)
