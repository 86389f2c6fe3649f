"""The package's compiled parts: the C training steps (src/backprop_ninja/training/mlp_step.c, the
lecture MLP's, and stack_step.c, the deep MLP's and the wavenet's), sharing step_kernels.h; and the
transformer's non-product ops (src/backprop_ninja/ops/transformer_kernels.c); and the models of whole
words' (src/backprop_ninja/ops/sequence_kernels.c: the RNN and GRU cells, and the C sequence step).
All four take their CPU-specific copies from src/backprop_ninja/ops/cpu_clones.h.

Everything else is declared in pyproject.toml. Each step is an optional extension: where no C
compiler is found the install still succeeds, and `train` uses the torch path (training/kernel.py,
training/stack_kernel.py). The libraries are plain C, loaded with ctypes: they need neither torch's
nor Python's headers.
"""

import platform
import sys

from setuptools import Extension, setup

# -fno-trapping-math lets branch-free selects vectorize; it changes no result (no code here reads
# the floating-point exception flags). The CPU-specific code paths come from target_clones in the
# source (ops/cpu_clones.h), so the build itself stays portable (no -march=native).
# -mprefer-vector-width=512 lets the AVX-512 copy's float64 tanh run 8 wide (6.8 us for the
# step's 6400 against 9.4).
FLAGS = [] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-Wno-psabi"]
if FLAGS and platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")

HERE = "src/backprop_ninja/training"
CLONES = "src/backprop_ninja/ops/cpu_clones.h"
SHARED = [f"{HERE}/step_kernels.h", CLONES]

setup(
    ext_modules=[
        Extension("backprop_ninja.training._mlp_step", [f"{HERE}/mlp_step.c"], depends=SHARED,
                  extra_compile_args=FLAGS, optional=True),
        Extension("backprop_ninja.training._stack_step", [f"{HERE}/stack_step.c"], depends=SHARED,
                  extra_compile_args=FLAGS, optional=True),
        Extension("backprop_ninja.ops._transformer_kernels", ["src/backprop_ninja/ops/transformer_kernels.c"],
                  depends=SHARED, extra_compile_args=FLAGS, optional=True),
        Extension("backprop_ninja.ops._sequence_kernels", ["src/backprop_ninja/ops/sequence_kernels.c"],
                  depends=SHARED, extra_compile_args=FLAGS, optional=True),
    ],
)
