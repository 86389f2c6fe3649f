"""A run's data, and the mean loss of each split in eval mode."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from backprop_ninja.conventions import IGNORE_INDEX
from backprop_ninja.data import Dataset, distinct_contexts, load_dataset, resolve_names
from backprop_ninja.models import Model
from backprop_ninja.training import stack_kernel

# Rows per forward pass when evaluating a whole split. Small enough that the (rows, H) temporaries
# are reused from the allocator's heap instead of mapped afresh for every chunk (docs/speed.md).
EVAL_CHUNK = 4096
# Words per forward pass of a model of whole words: its layers keep each position's cache for a
# backward pass (an rnn's T steps, a gru's ten tensors per step), so 4096 words at T = 16 would
# hold ~0.2 GB; 512 keep evaluation below the training step's own peak (docs/speed.md).
SEQUENCE_EVAL_CHUNK = 512


class RunData(NamedTuple):
    dataset: Dataset
    input: str | None  # absolute path of the word list, None for the default names data set
    sha256: str


def load_run_data(input_path: str | None, block_size: int | None, vocab=None, view: str = "windows",
                  max_word_length: int | None = None) -> RunData:
    path = Path(input_path).resolve() if input_path else resolve_names()
    limit = {} if max_word_length is None else {"max_word_length": max_word_length}
    dataset = load_dataset(path, block_size, vocab=vocab, view=view, **limit)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return RunData(dataset, str(path) if input_path else None, sha256)


def evaluate(model: Model, dataset: Dataset) -> dict[str, float | None]:
    """Mean cross-entropy of each split in eval mode (BatchNorm buffers); None for an empty split.

    The network runs once per distinct context of the split (data.distinct_contexts), EVAL_CHUNK
    contexts at a time; every example then reads its target's log-probability from its context's row.
    """
    device = model.device
    # a stack of layers runs the C step's eval-mode forward pass where that step runs (held to
    # model.logits by tests/test_stack_step.py); every other model its readable one
    logits = stack_kernel.eval_logits(model) or model.logits
    result: dict[str, float | None] = {}
    for name in ("train", "val", "test"):
        X, Y = dataset.split(name)
        if X.shape[0] == 0:
            result[name] = None
            continue
        if model.view == "sequences":
            result[name] = sequence_loss(model, X, Y)
            continue
        contexts = distinct_contexts(X)
        logprobs = torch.cat([F.log_softmax(logits(rows.to(device)), dim=1)  # (chunk, V)
                              for rows in contexts.rows.split(EVAL_CHUNK)])  # (U, V)
        nll = -logprobs[contexts.index.to(device), Y.to(device)]  # (N,)
        result[name] = nll.double().sum().item() / X.shape[0]
    return result


def sequence_loss(model: Model, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cross-entropy over the predicted characters of whole words (Y != -1), SEQUENCE_EVAL_CHUNK
    words at a time, each chunk as the model runs a batch with targets (model.live_batch: the
    transformer's live positions only)."""
    device = model.device
    total, count = 0.0, 0
    for Xc, Yc in zip(X.split(SEQUENCE_EVAL_CHUNK), Y.split(SEQUENCE_EVAL_CHUNK)):
        with model.live_batch(Xc.to(device), Yc.to(device)) as (Xc, Yc):
            logits = model.logits(Xc)  # (chunk, T', V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Yc.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")  # ()
        total += nll.double().item()
        count += int((Yc != IGNORE_INDEX).sum())
    return total / count


def format_losses(losses: dict[str, float | None]) -> str:
    return "\n".join(f"{name} {'n/a' if v is None else f'{v:.4f}'}" for name, v in losses.items())
