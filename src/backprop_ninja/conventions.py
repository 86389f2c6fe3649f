"""The conventions every module of the package follows, stated once.

Dimension legend (shape comments everywhere use these letters):

    B  batch: examples in a step
    T  positions: context length (block size) or time steps of a sequence
    E  embedding width
    F  fan-in of a Linear (F = T*E for the lecture MLP's first layer)
    H  hidden width (fan-out of a Linear)
    V  vocabulary size (characters + the end token)
    N  rows of a whole split;  U  distinct contexts among them
    R  live positions of a batch of sequences, packed one a row (ops.packing)
    nh heads of attention;  hs  head size, E / nh

Gradient policy: every backward returns *fresh* tensors and never accumulates into anything
(no `.grad`, no zero_grad()). Where a tensor feeds two branches, the code that made the branch
point sums the two gradients (nn.containers.Residual does it for residual branches).

Weight layout: a Linear's weight is (fan_in, fan_out), as in the lectures: out = x @ W + b.

BatchNorm: in training mode it normalises with the batch mean and the *unbiased* batch variance
(Bessel's correction, 1/(n-1)), with eps = 1e-5, exactly as the lectures' BatchNorm.

Sequences: a target of IGNORE_INDEX (-1, as makemore) is padding; the loss predicts nothing there.

Seeds: every makemore lecture draws from torch.Generator().manual_seed(2147483647), and samples
from the same seed + 10.
"""

LECTURE_SEED = 2147483647
SAMPLE_SEED = LECTURE_SEED + 10

IGNORE_INDEX = -1

BATCHNORM_EPS = 1e-5
BATCHNORM_UNBIASED = True  # Bessel's correction in training statistics and in calibration
