"""A run about to train: a new one from the model's recipe and the options, or one resumed.

    run = start(options)            # the model's defaults, overridden by the options given
    run = resume(run_dir, options)  # exactly where it stopped, heading for --steps
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.conventions import LECTURE_SEED
from backprop_ninja.errors import UserError
from backprop_ninja.models import Model, build_model, get_spec
from backprop_ninja.optim import Optimizer, make_optimizer
from backprop_ninja.training import checkpoint
from backprop_ninja.training.averaging import WeightAverage
from backprop_ninja.training.checkpoint import RunInfo
from backprop_ninja.training.evaluation import RunData, load_run_data

DEFAULT_MODEL = "mlp"
DEFAULT_BATCH_SIZE = 32
# per optimizer: (learning rate, weight decay). SGD's are the lecture's (lr / 10 after the recipe's
# decay point); AdamW's makemore's.
OPTIMIZER_DEFAULTS = {"sgd": (0.1, 0.0), "adamw": (5e-4, 0.01)}


@dataclass(frozen=True)
class TrainOptions:
    """What `backprop-ninja train` was asked; None means not given (the recipe's, or the run's own)."""

    model: str | None = None
    input: str | None = None
    out: str | None = None
    resume: bool = False
    plots: bool = False
    block_size: int | None = None
    embd: int | None = None
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    clip_grad_norm: float | None = None
    max_word_length: int | None = None
    device: str = "cpu"
    average_from: float | None = None
    no_average: bool = False
    verify_every: int | None = None
    eager: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.model or DEFAULT_MODEL}")


class Run(NamedTuple):
    """A run about to train: its model, optimizer, record, batch generator, losses (steps,) and data."""

    model: Model
    optimizer: Optimizer
    info: RunInfo
    g: torch.Generator
    losses: Tensor  # (info.steps,) float32; [:info.step] done, NaN after
    data: RunData
    average: WeightAverage | None  # the run's weight average, if its recipe averages
    resumed_from: RunInfo | None  # the record it resumed from


def start(options: TrainOptions, device: torch.device) -> Run:
    """A new run: the model's defaults, overridden by the options given."""
    model_name = options.model or DEFAULT_MODEL
    spec = get_spec(model_name)
    if options.max_word_length is not None and spec.view != "sequences":
        raise UserError(f"--max-word-length limits the models that read whole words; {model_name} reads "
                        f"windows of --block-size characters, and any word length")
    data = load_run_data(options.input, options.block_size or spec.block_size, view=spec.view,
                         max_word_length=options.max_word_length)
    check_trainable(data)
    ds = data.dataset
    config = spec.config(ds.vocab.size, block_size=ds.block_size, n_embd=options.embd, n_hidden=options.hidden,
                         n_layer=options.layers, n_head=options.heads)
    seed = LECTURE_SEED if options.seed is None else options.seed
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g).to(device)
    steps = options.steps or spec.steps
    optimizer_name = options.optimizer or spec.optimizer
    default_lr, default_decay = OPTIMIZER_DEFAULTS[optimizer_name]
    if optimizer_name == spec.optimizer:  # the recipe's own, where it has them
        default_lr = default_lr if spec.lr is None else spec.lr
        default_decay = default_decay if spec.weight_decay is None else spec.weight_decay
    info = RunInfo(
        config=config, chars=ds.vocab.chars, input=data.input, input_sha256=data.sha256,
        max_word_len=max(len(w) for ws in ds.words.values() for w in ws), seed=seed,
        batch_size=options.batch_size or DEFAULT_BATCH_SIZE, lr=options.lr or default_lr, decay_at=spec.decay_at,
        steps=steps, step=0, calibrated=False,
        average_from=None if options.no_average else (spec.average_from if options.average_from is None
                                                      else options.average_from),
        optimizer=optimizer_name,
        weight_decay=default_decay if options.weight_decay is None else options.weight_decay,
        clip_grad_norm=options.clip_grad_norm,
    )
    losses = torch.full((steps,), math.nan, device=device)  # (steps,)
    optimizer = make_optimizer(info.optimizer, model.params, weight_decay=info.weight_decay)
    return Run(model, optimizer, info, g, losses, data, weight_average(info), None)


def weight_average(info: RunInfo, mean: dict[str, Tensor] | None = None) -> WeightAverage | None:
    """The run's WeightAverage (with the snapshots taken so far), or None if its recipe does not average."""
    if info.average_from is None:
        return None
    return WeightAverage(int(info.average_from * info.steps), mean, info.averaged)


def resume(options: TrainOptions, device: torch.device) -> Run:
    """The run in options.run_dir, exactly where it stopped, heading for --steps (default: its own)."""
    run_dir = options.run_dir
    ckpt = checkpoint.load(run_dir, device)
    info = ckpt.info
    config = info.config
    given = {
        "--model": (options.model, config.model), "--block-size": (options.block_size, config.block_size),
        "--embd": (options.embd, getattr(config, "n_embd", None)),
        "--hidden": (options.hidden, getattr(config, "n_hidden", None)),
        "--layers": (options.layers, getattr(config, "n_layer", None)),
        "--heads": (options.heads, getattr(config, "n_head", None)),
        "--seed": (options.seed, info.seed), "--batch-size": (options.batch_size, info.batch_size),
        "--lr": (options.lr, info.lr), "--average-from": (options.average_from, info.average_from),
        "--optimizer": (options.optimizer, info.optimizer), "--weight-decay": (options.weight_decay, info.weight_decay),
        "--clip-grad-norm": (options.clip_grad_norm, info.clip_grad_norm),
    }
    if options.no_average and info.average_from is not None:
        raise UserError(f"--no-average: the run in {run_dir} averages its weights from {info.average_from} of its "
                        "steps; a resumed run keeps its settings (omit the option, or start a new run)")
    for option, (value, recorded) in given.items():
        if value is not None and value != recorded:
            raise UserError(f"{option} {value} differs from the run in {run_dir} ({recorded}); "
                            "a resumed run keeps its settings (omit the option, or start a new run)")
    steps = options.steps or info.steps
    if steps < info.step:
        raise UserError(f"--steps {steps}: the run in {run_dir} is already at step {info.step}")
    data = load_run_data(options.input or info.input, config.block_size, vocab=info.vocab,
                         view=ckpt.model.view)
    if data.sha256 != info.input_sha256:
        where = options.input or info.input or "the names data set"
        raise UserError(f"{where} is not the word list the run in {run_dir} was trained on (its sha256 differs)")
    g = torch.Generator().set_state(ckpt.generator_state)
    losses = torch.full((steps,), math.nan, device=device)  # (steps,)
    losses[: info.step] = ckpt.losses.to(device)
    mean = ckpt.average
    resumed_from = info
    if steps != info.steps:  # a new total moves the averaging point: the average starts afresh
        info, mean = replace(info, averaged=0), None
    info = replace(info, steps=steps, input=data.input)
    optimizer = make_optimizer(info.optimizer, ckpt.model.params, weight_decay=info.weight_decay)
    if ckpt.optimizer_state or not optimizer.state_dict():
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except ValueError as err:
            raise UserError(f"{run_dir}: the optimizer state does not fit {info.optimizer} ({err})") from None
    else:  # a run saved without it (makemore's --resume keeps only the model, too)
        print(f"note: {run_dir} has no {info.optimizer} state (a run saved without it): the optimizer restarts "
              f"at step {info.step} with fresh moments; the model and the batches continue", file=sys.stderr)
    return Run(ckpt.model, optimizer, info, g, losses, data, weight_average(info, mean), resumed_from)


def check_trainable(data: RunData) -> None:
    n_train = data.dataset.train.X.shape[0]
    if n_train < 2:  # BatchNorm's unbiased variance needs two examples, in a batch and at calibration
        where = data.input or "the names data set"
        what = "words" if data.dataset.view == "sequences" else "examples"
        raise UserError(f"{where}: too few words: the training split (80%) has {n_train} {what}, "
                        "a batch needs at least 2")
