"""The lecture's check, set up as the lecture sets it up: the network, one batch, autograd's gradients.

One generator, seeded, draws the parameters and then the batch (`ix = torch.randint(...)`), as the
lecture's cells do. `check`, `check --numerical` and the grader all start from this fixture.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.conventions import LECTURE_SEED
from backprop_ninja.data import load_dataset
from backprop_ninja.lecture import network
from backprop_ninja.models import MLPConfig, build_model

LECTURE_HIDDEN = 64  # the lecture checks its gradients on a 64-wide network (4137 parameters)
LECTURE_BATCH = 32
LECTURE_BLOCK = 3
LECTURE_EMBD = 10


class LectureSetup(NamedTuple):
    """One batch of the lecture's check: the parameters, the batch, the forward pass, autograd."""

    params: dict[str, Tensor]
    Xb: Tensor  # (n, T) contexts
    Yb: Tensor  # (n,) targets
    t: network.Intermediates  # the chunked forward pass, detached
    reference: dict[str, Tensor]  # autograd's gradient of each of the 26 tensors


def lecture_setup(
    seed: int = LECTURE_SEED, batch_size: int = LECTURE_BATCH, n_hidden: int = LECTURE_HIDDEN,
    input_path: str | None = None, dtype: torch.dtype = torch.float32,
) -> LectureSetup:
    """The lecture's cells: parameters, then `ix = torch.randint(...)` from the same generator."""
    ds = load_dataset(input_path, block_size=LECTURE_BLOCK)
    config = MLPConfig("mlp", vocab_size=ds.vocab.size, block_size=LECTURE_BLOCK, n_embd=LECTURE_EMBD,
                       n_hidden=n_hidden)
    g = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype) for k, v in build_model(config, g).params.items()}
    ix = torch.randint(0, ds.train.X.shape[0], (batch_size,), generator=g)  # (n,)
    Xb, Yb = ds.train.X[ix], ds.train.Y[ix]  # (n, T), (n,)
    t, reference = network.autograd_reference(params, Xb, Yb)
    return LectureSetup(params, Xb, Yb, t, reference)
